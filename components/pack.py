"""Decode, resample and pack every clip into one HDF5 file."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def pack(
    dataset: dsl.Input[dsl.Dataset],
    clip_seconds: float,
    cache_epoch: str,
    features: dsl.Output[dsl.Dataset],
    representation: str = "waveform",
):
    """Pack the dataset into `features` (HDF5: audio_name, the clips, target, fold).

    Args:
        dataset: the extracted tree from the download step.
        clip_seconds: clip length; 30 s is the seed's and GTZAN's.
        cache_epoch: unused by the step; part of KFP's cache key, so a cached result is
            served only within its cache period (pipelines.cv.CACHE_PERIOD_DAYS), while the
            bucket still holds it (infra/terraform's kfp_root_retention_days).
        features: the packed HDF5 file.
        representation: the clips as "waveform" (int16, the seed's form) or "logmel"
            (Cnn14's float16 front-end output: a fifth of the bytes, the same numbers up
            to float16 rounding; genreflow.features).
    """
    from genreflow.steps.pack import pack as pack_clips

    summary = pack_clips(
        dataset.path, features.path, clip_seconds=clip_seconds, representation=representation
    )
    features.metadata["clips"] = summary.clips
    features.metadata["representation"] = representation
    features.metadata["skipped"] = [name for name, _ in summary.skipped]
