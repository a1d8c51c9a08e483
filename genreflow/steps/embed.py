"""The embed step of the frozen-base path: every clip through the Cnn14 base once
(genreflow.embedding)."""

from __future__ import annotations

from pathlib import Path


def embed(
    features: str | Path,
    out: str | Path,
    *,
    pretrained: str = "",
    pretrained_sha256: str = "",
    batch_size: int = 16,
    device: str = "auto",
    precision: str = "auto",
    compile_base: str = "auto",
    seed: int = 0,
) -> dict:
    """Write `out`/embeddings.h5 (each clip's 2048-d embedding, eval mode) and `out`/base.pth
    (the base that made them) from the packed `features`; the embedding's summary.

    `pretrained`: a PANNs checkpoint (path, file://, http(s)://, gs://), "" for a random
    base seeded with `seed` (demos); `precision`: auto (bf16 where the hardware computes in
    it natively), fp32 or bf16; `compile_base`: torch.compile the base (auto: on a CPU for
    3 hours of audio or more). Killed, it resumes; finished, a rerun does nothing."""
    from genreflow.embedding import embed_features

    return embed_features(
        features,
        out,
        pretrained=pretrained or None,
        pretrained_sha256=pretrained_sha256 or None,
        batch_size=batch_size,
        device=device,
        precision=precision,
        compile_base=compile_base,
        seed=seed,
    )
