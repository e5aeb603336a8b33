"""Genesis playground on the Hub: generate from the step revisions of a model repo side by side.

Written into a Space folder as app.py by `genesis playground --space DIR --repo OWNER/NAME`, next
to space_ui.py (a verbatim copy of training/inspection/space_ui.py). On a ZeroGPU Space the
generation handlers run under @spaces.GPU; anywhere else (CPU Spaces, a laptop) they run as they are.

    python app.py                                          # what the Space runs: REPO_ID's revisions
    python app.py --revisions-dir DIR --port 7861          # local folders DIR/<revision>/ stand in
"""

from __future__ import annotations

import argparse
import os

import torch
from space_ui import HubRevisions, build_ui, theme

REPO_ID = "__GENESIS_REPO_ID__"  # written by genesis playground --space
COLUMNS = 4

try:  # ZeroGPU: a GPU is attached only while a decorated function runs
    import spaces

    gpu = spaces.GPU(duration=120)
    DEVICE = "cuda"
except ImportError:
    spaces = None

    def gpu(fn):
        return fn

    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_app(revisions_dir: str | None = None):
    backend = HubRevisions(REPO_ID, revisions_dir=revisions_dir, device=DEVICE, columns=COLUMNS,
                           dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    where = f"local folders in {revisions_dir}" if revisions_dir else f"[{REPO_ID}](https://huggingface.co/{REPO_ID})"
    intro = (f"Each checkpoint of {where} is a revision `step-XXXXXXXX`; pick several and compare. "
             "Leave the box empty and press Add to list steps uploaded since the page loaded.")
    return build_ui(backend, title="Genesis playground", intro=intro,
                    add_label="Add a revision (step-XXXXXXXX, a branch, a tag)", gpu=gpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--revisions-dir", default=os.environ.get("GENESIS_SPACE_REVISIONS_DIR"),
                   help="local from_pretrained folders named after revisions, instead of the Hub")
    p.add_argument("--host", default=None, help="default: gradio's (GRADIO_SERVER_NAME, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: gradio's (GRADIO_SERVER_PORT, 7860)")
    args, _ = p.parse_known_args()
    make_app(args.revisions_dir).launch(server_name=args.host, server_port=args.port, ssr_mode=False,
                                        show_error=True, theme=theme())


if __name__ == "__main__":
    main()
