"""Download, verify and safely extract a GTZAN archive (or accept an extracted folder)."""

from kfp import dsl

from genreflow.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def download(
    source: str, sha256: str, md5: str, cache_epoch: str, dataset: dsl.Output[dsl.Dataset]
):
    """Fetch the dataset into the `dataset` artifact's folder.

    Args:
        source: https://, http://, gs://, file:// or a path; an archive or an extracted tree.
        sha256: expected SHA-256 of the archive ("" = none; known URLs have one built in;
            "original": a copy of genres.tar.gz, checked against the original's checksums).
        md5: expected MD5 of the archive ("" = none).
        cache_epoch: unused by the step; part of KFP's cache key, so a cached result is
            served only within its cache period (pipelines.cv.CACHE_PERIOD_DAYS), while the
            bucket still holds it (infra/terraform's kfp_root_retention_days).
        dataset: the extracted tree, in any layout `genreflow pack` reads.
    """
    from genreflow.steps.download import download as fetch

    fetched = fetch(source, dataset.path, sha256=sha256, md5=md5)
    dataset.metadata["source"] = fetched.source  # redacted: KFP shows and stores metadata
    dataset.metadata["root"] = str(fetched.root)
