"""The frozen-base fast path, step one: every clip through the Cnn14 base once."""

from kfp import dsl

from genreflow.components.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def embed(
    features: dsl.Input[dsl.Dataset],
    pretrained: str,
    seed: int,
    precision: str,
    cache_epoch: str,
    embeddings: dsl.Output[dsl.Dataset],
):
    """Write each clip's 2048-d embedding (eval mode, no augmentation) and the base used.

    Args:
        features: the packed HDF5 file.
        pretrained: PANNs checkpoint (path, https:// or gs://); "" = random init from `seed`.
        seed: seeds the random base when there is no checkpoint.
        precision: auto (bf16 autocast where the hardware has it), fp32 or bf16; the
            pipeline's `precision`, the one fine-tuning uses.
        cache_epoch: unused by the step; part of KFP's cache key, so a cached result is
            served only within its cache period (pipelines.cv.CACHE_PERIOD_DAYS), while the
            bucket still holds it (infra/terraform's kfp_root_retention_days).
        embeddings: a folder with embeddings.h5 and base.pth.
    """
    from genreflow.embedding import embed_features

    embed_features(
        features.path,
        embeddings.path,
        pretrained=pretrained or None,
        seed=seed,
        precision=precision,
    )
