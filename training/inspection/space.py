"""`genesis playground --space DIR --repo OWNER/NAME [--push SPACE_ID]`: the playground as a Hub Space.

    genesis playground --space out/genesis-space --repo me/genesis-1b                 # write the folder
    genesis playground --space out/genesis-space --repo me/genesis-1b --push me/genesis-playground
    cd out/genesis-space && python app.py --revisions-dir runs/exports   # try it locally first

The folder (a new one; an existing folder is refused):
    README.md         Space metadata (sdk gradio, sdk_version, app_file, models, ZeroGPU hardware)
    app.py            training/inspection/space_app.py with REPO_ID filled in
    space_ui.py       training/inspection/space_ui.py, verbatim: the UI the local playground uses too
    requirements.txt  torch, transformers (this version: the export's modeling code targets it), hub
The Space does not install Genesis: the exports carry their modeling code (auto_map), so
`trust_remote_code=True` loads them, and the UI module travels as a file (docs/inspect.md).
Pushing uses HF_TOKEN from the environment (huggingface_hub reads it; never a flag).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from . import InspectError

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
FILES = ("README.md", "app.py", "requirements.txt", "space_ui.py")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REPO_PLACEHOLDER = '"__GENESIS_REPO_ID__"'


def readme(repo_id: str, title: str) -> str:
    import gradio

    return "\n".join([
        "---",
        f"title: {title}",
        "emoji: 🌱",
        "colorFrom: green",
        "colorTo: blue",
        "sdk: gradio",
        f"sdk_version: {gradio.__version__}",
        "app_file: app.py",
        "pinned: false",
        "suggested_hardware: zero-a10g",
        "models:",
        f"  - {repo_id}",
        f"short_description: {repo_id}'s checkpoints side by side",
        "---",
        "",
        f"# {title}",
        "",
        f"Generate from the checkpoints of [{repo_id}](https://huggingface.co/{repo_id}) side by side: each",
        "uploaded training step is a revision `step-XXXXXXXX`. Written by `genesis playground --space`;",
        "on ZeroGPU hardware the generations run under `@spaces.GPU`, elsewhere on whatever the Space has.",
        "",
    ])


def requirements() -> str:
    import transformers

    return "\n".join(["torch", f"transformers=={transformers.__version__}", "safetensors", "huggingface_hub",
                      ""])


def write_space(dst: str | Path, repo_id: str, *, title: str = "Genesis playground", columns: int = 4) -> Path:
    """Write the Space folder `dst` (which must not exist) for the model repo `repo_id`."""
    dst = Path(dst)
    if not _REPO_RE.match(repo_id or ""):
        raise InspectError(f"--repo must be the model repo as owner/name, got {repo_id!r}")
    if dst.exists():
        raise InspectError(f"{dst} already exists; refusing to write a Space over it (pick a new folder)")
    app = (HERE / "space_app.py").read_text(encoding="utf-8")
    if REPO_PLACEHOLDER not in app:
        raise InspectError(f"{HERE / 'space_app.py'} lacks the REPO_ID placeholder")
    app = app.replace(REPO_PLACEHOLDER, repr(repo_id)).replace("COLUMNS = 4", f"COLUMNS = {int(columns)}")
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "app.py").write_text(app, encoding="utf-8")
    shutil.copyfile(HERE / "space_ui.py", tmp / "space_ui.py")
    (tmp / "requirements.txt").write_text(requirements(), encoding="utf-8")
    (tmp / "README.md").write_text(readme(repo_id, title), encoding="utf-8")
    tmp.rename(dst)
    logger.info("wrote the Space folder %s for %s", dst, repo_id)
    return dst


def push_space(folder: str | Path, space_id: str, *, private: bool | None = None) -> str:
    """Create the Space (gradio SDK) if needed and upload the folder as one commit; the commit URL."""
    from huggingface_hub import HfApi

    if not _REPO_RE.match(space_id or ""):
        raise InspectError(f"--push must be the Space as owner/name, got {space_id!r}")
    api = HfApi()
    space_id = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private,
                               exist_ok=True).repo_id
    info = api.upload_folder(repo_id=space_id, repo_type="space", folder_path=str(folder),
                             allow_patterns=list(FILES), commit_message="Genesis playground (genesis playground --space)")
    return str(getattr(info, "commit_url", info))


def cli_main(args) -> int:
    """The --space branch of `genesis playground` (args from its parser)."""
    import sys

    try:
        folder = write_space(args.space, args.repo, title=args.title, columns=args.columns)
        print(f"Space folder: {folder} (try it: cd {folder} && python app.py --revisions-dir <folders named "
              "after revisions>)")
        if args.push:
            url = push_space(folder, args.push)
            print(f"pushed to https://huggingface.co/spaces/{args.push} ({url})")
    except InspectError as e:
        print(f"genesis playground: {e}", file=sys.stderr)
        return 2
    return 0
