"""The fold ensemble's life in the MLflow model registry: register, then promote.

- `register_version`: a pipeline run's ensemble becomes a new version of the registered
  model, tagged with what produced it (protocol, selection, accuracy and its quoted
  interval, partial, git commit, data and split checksums, the parent run) and described
  in a sentence; it gets the alias `candidate`. A run whose checkpoints were chosen on test
  data (selection=heldout) or whose result is partial is not registered unless asked
  (`registration_refusal`).
- `promote` (`genreflow promote`): moves the alias `champion` to the candidate only when
  `genreflow compare`'s statistics (genreflow.compare) find no significant loss against
  the current champion on the same protocol, data and split; the first candidate becomes
  champion. The verdict is Markdown, fit for a CI comment.

This is the policy; the registry's calls are genreflow.tracking.models'.
"""

from __future__ import annotations

import json
from pathlib import Path

from genreflow.errors import GenreflowError
from genreflow.tracking.names import (
    CHECKSUM_TAGS,
    DATA_SHA256_TAG,
    GIT_COMMIT_TAG,
    PARENT_RUN_TAG,
    PARTIAL_TAG,
    PROMOTION_TAG,
    PROTOCOL_TAG,
    SELECTION_TAG,
    SPLIT_SHA256_TAG,
)

CANDIDATE = "candidate"
CHAMPION = "champion"
# What must agree between champion and candidate for their folds to be paired samples.
SAME = (PROTOCOL_TAG, *CHECKSUM_TAGS)


def registration_refusal(report: dict) -> str:
    """Why this result should not be registered without being asked ("" where it should)."""
    reasons = []
    if report.get("selection") != "validation":
        reasons.append(
            f"its checkpoints were chosen with selection={report.get('selection')} "
            "(on test data: optimistic)"
        )
    if report.get("partial"):
        reasons.append(
            f"it is partial ({len(report['usable_folds'])} of "
            f"{len(report['expected_folds'])} folds)"
        )
    return " and ".join(reasons)


def version_tags(report: dict, *, parent_run_id: str, git_commit: str) -> dict[str, str]:
    """A version's tags, from the aggregate report of the run that made it."""
    from genreflow.aggregate import flat_metrics

    metrics = flat_metrics(report)
    accuracy = report["accuracy"]
    interval = accuracy.get("reported_ci") or accuracy.get("corrected_ci") or {}
    tags = {
        PROTOCOL_TAG: report["protocol"],
        SELECTION_TAG: str(report.get("selection")),
        PARTIAL_TAG: json.dumps(bool(report.get("partial"))),
        "folds": ",".join(str(f) for f in report["usable_folds"]),
        "accuracy_mean": f"{metrics['accuracy_mean']:.4f}",
        GIT_COMMIT_TAG: git_commit,
        DATA_SHA256_TAG: str(report.get("data_sha256") or ""),
        SPLIT_SHA256_TAG: str(report.get("split_sha256") or ""),
        PARENT_RUN_TAG: parent_run_id,
    }
    if "accuracy_ci95_low" in metrics:
        tags["accuracy_ci95"] = (
            f"[{metrics['accuracy_ci95_low']:.4f}, {metrics['accuracy_ci95_high']:.4f}]"
        )
        tags["accuracy_ci95_method"] = str(interval.get("method", "")).split(":")[0]
    return tags


def describe(tags: dict[str, str]) -> str:
    """A version's description: what it is and how good, in one paragraph."""
    from genreflow.aggregate import PROTOCOL_LABELS, selection_label

    protocol = tags[PROTOCOL_TAG]
    folds = tags["folds"].split(",")
    noun = "fold" if protocol == "cv10" else "repetition"
    text = (
        f"Fold ensemble of {len(folds)} {noun}s ({PROTOCOL_LABELS.get(protocol, protocol)}; "
        f"{selection_label(tags[SELECTION_TAG], protocol)}). Accuracy {tags['accuracy_mean']}"
    )
    if "accuracy_ci95" in tags:
        text += f", 95% interval {tags['accuracy_ci95']} ({tags['accuracy_ci95_method']})"
    if tags[PARTIAL_TAG] == "true":
        text += "; a partial result"
    return (
        f"{text}. Pipeline run {tags[PARENT_RUN_TAG]}, commit {tags[GIT_COMMIT_TAG]}. "
        "Input: a table with a column 'audio' of audio files' bytes; output: 'genre' and "
        "one probability per genre."
    )


def register_version(
    tracking_uri: str, name: str, model_id: str, *, parent_run_id: str, tags: dict[str, str]
) -> str:
    """Register the LoggedModel `model_id` as a new version of `name`, tagged, described
    and given the alias `candidate`; the version's number."""
    from genreflow.tracking.models import register_version as register

    return register(
        tracking_uri,
        name,
        model_id,
        run_id=parent_run_id,
        tags=tags,
        description=describe(tags),
        alias=CANDIDATE,
    )


# --- promotion ---------------------------------------------------------------------------
def _summary(version) -> dict:
    tags = version.tags
    return {
        "version": str(version.version),
        "run_id": version.run_id or tags.get(PARENT_RUN_TAG, ""),
        **{k: tags.get(k, "") for k in (PROTOCOL_TAG, SELECTION_TAG, PARTIAL_TAG, "accuracy_mean")},
        "accuracy_ci95": tags.get("accuracy_ci95", ""),
        **{k: tags.get(k, "") for k in CHECKSUM_TAGS},
    }


def promote(tracking_uri: str, name: str, *, version: str | None = None) -> dict:
    """Move `champion` to the candidate (the `candidate` alias, or `version`) unless the
    comparison with the current champion shows a significant loss (B - A: candidate minus
    champion, the corrected interval of `genreflow compare` entirely below 0) or cannot be
    made (another protocol, other data or split, too few folds). A candidate whose
    checkpoints were chosen on test data, or whose result is partial, is held back.

    Returns:
        {"promoted", "decision" (one line), "candidate", "champion" (before; None), and
        "comparison" (genreflow.compare's result; None where none was made)}.

    Raises:
        GenreflowError: no such model, version or candidate.
    """
    from mlflow.exceptions import MlflowException

    from genreflow.compare import compare_runs
    from genreflow.tracking.client import client as tracking_client
    from genreflow.tracking.models import version_by_alias

    client = tracking_client(tracking_uri)
    try:
        if version is None:
            chosen = version_by_alias(client, name, CANDIDATE)
            if chosen is None:
                raise GenreflowError(
                    f"{tracking_uri}: registered model {name!r} has no version with the alias "
                    f"'{CANDIDATE}' (a pipeline run registers one)"
                )
        else:
            chosen = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise GenreflowError(f"{tracking_uri}: {name!r} version {version}: {exc.message}") from None
    candidate = _summary(chosen)
    current = version_by_alias(client, name, CHAMPION)
    champion = _summary(current) if current is not None else None
    result = {
        "model": name,
        "candidate": candidate,
        "champion": champion,
        "comparison": None,
        "promoted": False,
    }

    def hold(reason: str) -> dict:
        result["decision"] = f"held back: {reason}"
        client.set_model_version_tag(name, candidate["version"], PROMOTION_TAG, "held back")
        return result

    if candidate["selection"] != "validation" or candidate["partial"] == "true":
        return hold(
            f"version {candidate['version']} was chosen with selection="
            f"{candidate['selection']}, partial={candidate['partial']}; a champion needs "
            "selection=validation and every fold"
        )
    if champion is not None and champion["version"] == candidate["version"]:
        result["decision"] = f"version {candidate['version']} is already the champion"
        result["promoted"] = True
        return result
    if champion is not None:
        for key in SAME:
            if champion[key] != candidate[key]:
                was, now = champion[key] or "unrecorded", candidate[key] or "unrecorded"
                return hold(
                    f"the champion (version {champion['version']}) has {key} {was}, the "
                    f"candidate {now}: their folds are not paired samples, so there is no "
                    "comparison to promote on"
                )
        comparison = compare_runs(
            champion["run_id"], candidate["run_id"], tracking_uri=tracking_uri
        )
        result["comparison"] = comparison
        test = comparison["test"]
        if test is None:
            return hold(f"no test ({comparison['no_test']})")
        if test["ci"]["high"] < 0:
            return hold(
                f"a significant loss against the champion (version {champion['version']}): "
                f"{comparison['verdict']}"
            )
        reason = (
            f"no significant loss against version {champion['version']}: {comparison['verdict']}"
        )
    else:
        reason = "the first candidate: there was no champion"
    client.set_registered_model_alias(name, CHAMPION, candidate["version"])
    client.set_model_version_tag(name, candidate["version"], PROMOTION_TAG, "champion")
    result["promoted"] = True
    result["decision"] = f"promoted: {reason}"
    return result


def render_markdown(result: dict) -> str:
    """The promotion's verdict as Markdown for a CI comment (the comparison below it)."""
    from genreflow.compare import render_markdown as comparison_markdown

    candidate, champion = result["candidate"], result["champion"]
    moved = result["promoted"] and (champion is None or champion["version"] != candidate["version"])
    headline = (
        f"**Promoted:** version {candidate['version']} is now `{CHAMPION}`"
        if moved
        else f"**Not promoted:** `{CHAMPION}` stays "
        + (f"version {champion['version']}" if champion else "unset")
    )
    lines = [
        f"## genreflow promote: {result['model']} version {candidate['version']}",
        "",
        headline,
        "",
        f"Decision: {result['decision']}",
        "",
        "| | version | run | protocol | selection | accuracy | 95% interval |",
        "|---|---:|---|---|---|---:|---|",
    ]
    for label, row in (("candidate", candidate), ("champion (before)", champion)):
        if row is not None:
            lines.append(
                f"| {label} | {row['version']} | `{row['run_id']}` | {row['protocol']} | "
                f"{row['selection']} | {row['accuracy_mean']} | {row['accuracy_ci95']} |"
            )
    if result["comparison"] is not None:
        lines += ["", "A = the champion, B = the candidate.", ""]
        lines.append(comparison_markdown(result["comparison"]).replace("## ", "### ", 1))
    return "\n".join(lines).rstrip("\n") + "\n"


def write_markdown(result: dict, path: str | Path) -> Path:
    """Write render_markdown(result) to path (atomically); the path."""
    from genreflow.compare import write_markdown as write

    return write(result, path, render=render_markdown)
