"""Ask the index torch should come from (the Makefile's TORCH_INDEX) whether it answers.

    python torch_index.py URL               # prints URL when it answers, else nothing
    python torch_index.py --pip-option URL  # prints "--index-url URL" when it answers

`make install` and `make image-test` run it before installing torch. PyTorch's CPU wheel
index keeps torch the CPU build (a bare `torch` from PyPI is the multi-GB CUDA one), but a
machine whose pip is set up for other sources (a private mirror, local wheels, no way out)
may not reach it, and pip would spend minutes on retries there (PIP_DEFAULT_TIMEOUT, five
retries a page). So the index is asked once, with a short timeout, for its torch page; when
it does not answer it is left out, with a line on stderr that says so, and pip installs
torch from its own configuration. Standard library only: it runs before anything else.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 5.0


def answers(url: str, timeout: float = TIMEOUT_S) -> str | None:
    """None when the index serves a torch page, else why not (one line)."""
    page = url.rstrip("/") + "/torch/"
    if url.startswith("file://"):
        found = Path(page.removeprefix("file://")).exists()
        return None if found else f"{page.removeprefix('file://')} does not exist"
    # pip's own CA bundle where one is set (a proxy's certificate), else the system's.
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    request = urllib.request.Request(page, headers={"User-Agent": "genreflow-torch-index"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context):
            return None
    except urllib.error.HTTPError as exc:
        return f"{page} answered HTTP {exc.code}"
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused, a malformed URL
        return f"{page}: {getattr(exc, 'reason', exc)}"


def main(argv: list[str]) -> int:
    pip_option = argv[:1] == ["--pip-option"]
    args = argv[1:] if pip_option else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    url = args[0].strip()
    if not url:
        return 0
    why = answers(url)
    if why is not None:
        print(
            f"TORCH_INDEX={url} left out: it does not answer ({why}); torch comes from "
            "pip's own configuration instead (TORCH_INDEX= skips this check)",
            file=sys.stderr,
        )
        return 0
    print(f"--index-url {url}" if pip_option else url)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
