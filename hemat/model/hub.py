"""Model sources: a local checkpoint directory, or a Hugging Face Hub id `org/name[@revision]` resolved
through huggingface_hub's cache (the cache first; a download only when the snapshot is not there and
HF_HUB_OFFLINE is not set). Only safetensors weights, configs, tokenizer files and chat templates are
fetched: pickle weights (*.bin, *.pt, ...) are never downloaded."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hemat.errors import HematError

# everything hemat reads from a model directory, and nothing else
ALLOW_PATTERNS = [
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "hemat.json",
]
_HUB_ID = re.compile(r"^(?P<repo>\w[\w.-]*/\w[\w.-]*)(?:@(?P<revision>[\w./-]+))?$")


class HubError(HematError):
    """A model id that is neither a local directory nor resolvable on the Hugging Face Hub."""


def is_hub_id(source: str | Path) -> bool:
    """Whether `source` names a Hub model: an `org/name[@revision]` string that is not an existing path
    (nor a .gguf file name, which the GGUF loader names when it is missing)."""
    return (isinstance(source, str) and not source.lower().endswith(".gguf") and not Path(source).exists()
            and bool(_HUB_ID.match(source)))


def resolve_model_source(source: str | Path) -> Path:
    """A local path as is (an existing path always wins); `org/name[@revision]` → the directory of its
    snapshot in the Hugging Face cache, downloaded first when missing and HF_HUB_OFFLINE is not set."""
    if not is_hub_id(source):
        return Path(source)  # a missing local path is named by the loader that needs it
    match = _HUB_ID.match(source)
    return _snapshot(match["repo"], match["revision"])


def _snapshot(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    cache = _cache_dir()
    name = f"{repo}@{revision}" if revision else repo
    kwargs = dict(repo_id=repo, revision=revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
    try:
        try:
            return Path(snapshot_download(**kwargs, local_files_only=True))
        except LocalEntryNotFoundError:
            if offline:
                raise
        return Path(snapshot_download(**kwargs))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:  # the hub's HTTP errors are OSErrors
        where = f"the Hugging Face cache ({cache or 'default location'})"
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise HubError(f"model {name!r} is not a local path and not in {where}, and it could not be "
                       f"downloaded ({reason})") from None


def _cache_dir() -> str | None:
    """The hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None
