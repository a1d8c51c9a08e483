"""Named sets of pipeline arguments: what `genreflow run --profile NAME` passes.

- seed: the recipe of qiuqiangkong/panns_transfer_to_gtzan (runme.sh and main.py): the
  published Cnn14_mAP=0.431.pth, the whole network fine-tuned, Adam lr 1e-4, batch 32,
  mixup, 10,000 iterations, 30 s clips, and the seed's model selection: it watched the
  held-out fold while training (`selection="heldout"`), so its numbers compare with the
  published ones. A GPU job (about 30 minutes a fold on a V100).
- demo: the embedded default. A synthetic GTZAN-shaped set of short clips and the
  frozen-base fast path, so the whole 10-fold DAG finishes in minutes on two CPU cores.
  The published weights cannot be fetched here, so the base is a seeded random Cnn14.
"""

from __future__ import annotations

# Zenodo record 3987831 (the PANNs release), as named in the seed's runme.sh.
PANNS_CNN14_URL = "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1"

PROFILES: dict[str, dict] = {
    "seed": dict(
        pretrained=PANNS_CNN14_URL,
        freeze_base=False,
        clip_seconds=30.0,
        iterations=10000,
        batch_size=32,
        lr=1e-4,
        mixup=True,
        eval_every=200,
        selection="heldout",
    ),
    "demo": dict(
        pretrained="",
        freeze_base=True,
        clip_seconds=2.0,
        # The head's recipe (genreflow.frozen): full batch, AdamW, weight decay 1.
        iterations=1000,
        batch_size=0,
        lr=1e-3,
        mixup=False,
        eval_every=100,
    ),
}
# The synthetic set the demo makes when no --source is given: GTZAN's 1000 file names, so
# both protocols run on it (the fault-filtered lists name clips up to genre.00099).
DEMO_SYNTH = dict(clips_per_genre=100, seconds=2.0, seed=0)
