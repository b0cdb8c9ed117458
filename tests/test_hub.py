"""Hub ids `org/name[@revision]` resolved through a cache laid out as huggingface_hub lays it out
(models--org--name/{refs,snapshots,blobs}), offline."""

import hashlib
import os

import pytest
import torch

import hemat
from hemat.cli import main
from hemat.model.config import ModelConfig
from hemat.model.hf import CheckpointError
from hemat.model.hub import HubError
from hemat.model.transformer import CausalLM
from hemat.tokenizer import train_tokenizer

COMMIT, COMMIT_V1 = "a" * 40, "b" * 40


def put_in_cache(cache, repo: str, source_dir, commit: str, refs=("main",)) -> None:
    """Store source_dir's files as the hub does: content-addressed blobs, a snapshot of symlinks, refs."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source_dir.iterdir()):
        data = file.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)


def _model_dir(root, seed: int, tokenizer_dir=None):
    """A tiny llama with a trained tokenizer (or a copy of tokenizer_dir's) saved in root."""
    if tokenizer_dir is None:
        (root.parent / "corpus.txt").write_text("Hello there, the answer is 42. Think it through.\n" * 30)
        train_tokenizer([root.parent / "corpus.txt"], 300, root, show_progress=False)
    else:
        hemat.load_tokenizer(tokenizer_dir).save(root)
    torch.manual_seed(seed)
    config = ModelConfig(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, initializer_range=0.5)
    model = CausalLM(config).eval()
    model.save_pretrained(root)
    return model


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache with org/tiny (main → COMMIT; tag v1 → COMMIT_V1, other weights) and org/pickled."""
    root = tmp_path_factory.mktemp("hub")
    main_model = _model_dir(root / "main", seed=0)
    v1_model = _model_dir(root / "v1", seed=1, tokenizer_dir=root / "main")
    put_in_cache(root / "cache", "org/tiny", root / "main", COMMIT)
    put_in_cache(root / "cache", "org/tiny", root / "v1", COMMIT_V1, refs=("v1",))
    (root / "pickled").mkdir()
    (root / "pickled" / "config.json").write_text((root / "main" / "config.json").read_text())
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    put_in_cache(root / "cache", "org/pickled", root / "pickled", COMMIT)
    return root, main_model, v1_model


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0] / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(12)[None])


def test_hub_ids_and_revisions_load_from_the_cache(offline):
    root, main_model, v1_model = offline
    assert torch.equal(_logits(hemat.from_pretrained("org/tiny")), _logits(main_model))
    assert torch.equal(_logits(hemat.from_pretrained("org/tiny@v1")), _logits(v1_model))
    assert torch.equal(_logits(hemat.from_pretrained(f"org/tiny@{COMMIT_V1}")), _logits(v1_model))
    tokenizer = hemat.load_tokenizer("org/tiny@v1")
    assert tokenizer.encode("Hello there") == hemat.load_tokenizer(root / "main").encode("Hello there")


def test_a_local_path_wins_over_a_hub_id(offline, tmp_path, monkeypatch):
    root, _, v1_model = offline
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(root / "v1")
    assert torch.equal(_logits(hemat.from_pretrained("org/tiny")), _logits(v1_model))


def test_generate_command_takes_a_hub_id(offline, capsys):
    root = offline[0]
    args = ["--prompt", "Hello", "--temperature", "0", "--max-tokens", "6"]
    main(["generate", "--model", str(root / "main"), *args])
    local = capsys.readouterr().out
    main(["generate", "--model", "org/tiny", *args])
    assert capsys.readouterr().out == local and local.strip()


def test_unknown_ids_and_revisions_name_themselves(offline):
    with pytest.raises(HubError, match=r"model 'org/missing' is not a local path and not in the Hugging Face "
                                       r"cache .*HF_HUB_OFFLINE is set"):
        hemat.from_pretrained("org/missing")
    with pytest.raises(HubError, match=r"model 'org/tiny@v9'"):
        hemat.load_tokenizer("org/tiny@v9")
    with pytest.raises(SystemExit, match=r"hemat generate: model 'org/missing@main' is not a local path"):
        main(["generate", "--model", "org/missing@main", "--prompt", "hi"])


def test_a_cached_repo_with_only_pickle_weights_is_refused(offline):
    with pytest.raises(CheckpointError, match=r"^org/pickled holds only pickle weights \(pytorch_model.bin\); "
                                              r"hemat loads "
                                              r"safetensors only"):
        hemat.from_pretrained("org/pickled")


def test_eval_and_training_stages_take_a_hub_id(offline, tmp_path, monkeypatch):
    import json

    from hemat.train.stage import starting_checkpoint

    assert starting_checkpoint("org/tiny@v1", "sft").name == COMMIT_V1
    monkeypatch.chdir(tmp_path)
    (tmp_path / "val.txt").write_text("Hello there, the answer is 42.\n")
    main(["eval", "--model", "org/tiny", "--tasks", "bpb:val.txt"])
    summary = json.loads((tmp_path / "eval" / "org--tiny" / "results.json").read_text())  # not in the cache
    assert summary["model"] == "org/tiny" and summary["tasks"]["bpb:val.txt"]["metrics"]["bpb"] > 0


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    from hemat.model.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    assert is_hub_id("org/name") and is_hub_id("deepseek-ai/DeepSeek-V3@refs/pr/1")
    assert not any(map(is_hub_id, ["./runs", "/abs/dir", "a/b/c", "name", "org/name@"]))
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # an existing path is a path
