"""Peak memory of `hemat.from_pretrained` against the size of what it returns, for a DeepSeek-V3 checkpoint
in DeepSeek's FP8 layout and the same model in bf16. Each load runs in a fresh process; the increase of its
peak RSS over the RSS after imports is compared with the loaded model's bytes. RSS includes the pages of
the safetensors files that the load touched (they are memory-mapped).

    PYTHONPATH=. python benchmarks/load_memory.py [--layers 6] [--dir /tmp/hemat-load-memory]"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def make_checkpoints(root: Path, layers: int) -> None:
    import torch

    from hemat.model.config import ModelConfig
    from hemat.model.transformer import CausalLM

    torch.manual_seed(0)
    config = ModelConfig(model_type="deepseek_v3", vocab_size=32768, hidden_size=1024, intermediate_size=2816,
                         moe_intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
                         n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, q_lora_rank=512,
                         kv_lora_rank=256, first_k_dense_replace=1, num_nextn_predict_layers=1)
    model = CausalLM(config)
    model.save_pretrained(root / "fp8", format="fp8")
    model.save_pretrained(root / "bf16", format="bf16")


def measure(path: str, dtype: str) -> dict:
    import torch  # noqa: F401  (imports count as the baseline)

    import hemat
    from hemat.model import hf  # noqa: F401

    baseline = _status_kib("VmRSS")
    model = hemat.from_pretrained(path, dtype=dtype)
    result = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"params": sum(p.numel() for p in model.parameters()), "result_bytes": result,
            "peak_increase_bytes": (_status_kib("VmHWM") - baseline) * 1024}


def _status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB; unlike ru_maxrss, VmHWM starts afresh at exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dir", default="/tmp/hemat-load-memory")
    parser.add_argument("--measure", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    make_checkpoints(root, args.layers)
    for source in ("fp8", "bf16"):
        disk = sum(f.stat().st_size for f in (root / source).glob("*.safetensors"))
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(root / source), dtype],
                                 check=True, capture_output=True, text=True).stdout
            m = json.loads(out)
            print(f"{source} checkpoint ({disk / 2**20:.0f} MiB on disk, {m['params'] / 1e6:.0f}M params) -> "
                  f"{dtype}: result {m['result_bytes'] / 2**20:.0f} MiB, peak RSS increase "
                  f"{m['peak_increase_bytes'] / 2**20:.0f} MiB ({m['peak_increase_bytes'] / m['result_bytes']:.2f}x)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
