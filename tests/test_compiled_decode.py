"""The CPU decode step and MTP draft-and-verify round compiled by torch.compile (compiled_decode.py): the
same greedy tokens as the eager engine, compile time kept off the requests, a clean fall back to eager
where compiling fails, and a clean exit while a bucket compiles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from hemat.infer.engine import Engine
from hemat.infer.quantize import prepare_for_inference
from hemat.infer.sampling import SamplingParams
from hemat.model.transformer import CausalLM
from tests.test_engine import GREEDY, mostly_bigram, naive_greedy, prompt, tiny_model
from tests.test_quantize import llama_config, mla_config


def greedy_tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    # different lengths, so that the batch shrinks from 2 rows to 1 while decoding
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (24, 9, 16)]
    return [out.outputs[0].token_ids for out in engine.generate(prompts, params)]


def test_compiled_decode_gives_the_eager_greedy_tokens():
    model = tiny_model("deepseek_v3")  # MLA and routed experts: the paths with compile-only forms
    prompts = [prompt(n, seed=n) for n in (5, 19, 11)]
    expected = greedy_tokens(Engine(model, max_batch_size=2, page_size=4, speculative="off"), prompts)
    engine = Engine(model, max_batch_size=2, page_size=4, speculative="off", compile_decode=True)
    compiled = engine.static_decode.compiled
    assert greedy_tokens(engine, prompts) == expected  # while the buckets compile in the background
    compiled.wait()  # the batch-1 bucket (queued at start-up) and the batch-2 one (queued after two uses)
    stats = engine.stats()
    assert stats["decode_compiled_buckets"] == 2 and not stats["decode_compile_failed"]
    assert stats["decode_compile_s"] > 0
    steps = stats["decode_compiled_steps"]
    assert greedy_tokens(engine, prompts) == expected
    assert engine.stats()["decode_compiled_steps"] - steps == 23  # every decode step of the second run


def test_a_failed_compile_prints_one_line_and_decodes_eagerly(capsys):
    # int8 experts have no static-shape form: the routing decides their row counts, which a whole-step
    # graph cannot take
    torch.manual_seed(0)
    model = prepare_for_inference(CausalLM(mla_config()).eval(), "int8")
    prompts = [prompt(n, seed=n) for n in (5, 19, 11)]
    expected = greedy_tokens(Engine(model, max_batch_size=2, page_size=4, speculative="off"), prompts)
    engine = Engine(model, max_batch_size=2, page_size=4, speculative="off", compile_decode=True)
    engine.static_decode.compiled.wait()
    lines = [line for line in capsys.readouterr().out.splitlines() if "torch.compile" in line]
    assert len(lines) == 1 and lines[0].endswith("decoding eagerly")
    assert greedy_tokens(engine, prompts) == expected
    stats = engine.stats()
    assert stats["decode_compile_failed"] and stats["decode_compiled_steps"] == 0


def test_compiled_mtp_rounds_give_plain_greedy_tokens():
    """Greedy draft-and-verify rounds compiled per bucket: drafts accepted or not, the output is plain
    greedy decoding's, padding rows (3 sequences in the batch-4 bucket) count for nothing, and once the
    bucket is ready every round of the full batch runs compiled."""
    model = mostly_bigram(tiny_model("deepseek_v3", seed=1), scale=0.01)  # drafts often accepted
    engine = Engine(model, max_batch_size=4, page_size=4, speculative="mtp", num_speculative_tokens=2,
                    compile_decode=True)
    compiled = engine.compiled_steps
    compiled.queue((*engine.drafter.bucket(4, 1), 2))
    compiled.wait()  # that bucket and the batch-1 one, queued at start-up
    prompts = [prompt(n, seed=n) for n in (3, 13, 8)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=15, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == [naive_greedy(model, p, 15) for p in prompts]
    stats = engine.stats()
    assert stats["decode_compiled_buckets"] == 2 and not stats["decode_compile_failed"]
    assert stats["decode_compiled_steps"] >= 5  # the rounds while all 3 sequences ran, at least
    assert stats["spec_rounds"] < stats["spec_accepted"] < stats["spec_drafted"]  # some drafts accepted, some not


def test_a_process_that_exits_while_a_bucket_compiles_exits_cleanly():
    # the interpreter shutting down under the compiler thread aborted the process (exit status 134)
    script = ("from hemat.infer.engine import Engine\nfrom tests.test_engine import tiny_model\n"
              "Engine(tiny_model('deepseek_v3'), page_size=4, speculative='off', compile_decode=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.compile" not in done.stdout  # no failure reported for the compile cut short


def test_loading_and_serving_code_does_not_import_the_compiler():
    # torch._dynamo costs 1.3 s and 0.14 GB of every process that imports it; only compiling should pay that
    code = ("import sys, hemat, hemat.infer.engine, hemat.infer.quantize, hemat.serve.app, hemat.model.transformer; "
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_loading_a_checkpoint_imports_neither_the_compiler_nor_sympy(tmp_path):
    # a model to be loaded is built on the meta device, where torch's kernels for random initialisation and
    # for arithmetic import torch._dynamo: the loader skips the one, the rotary tables are computed on the CPU;
    # and Module.to_empty on meta tensors imports sympy (36 MB)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    CausalLM(mla_config(num_nextn_predict_layers=1, rope_scaling=yarn)).save_pretrained(tmp_path / "mla")
    CausalLM(llama_config(tie_word_embeddings=False)).save_pretrained(tmp_path / "llama")
    code = (f"import sys, hemat; root = {str(tmp_path)!r}; hemat.load_for_inference(root + '/llama', 'int4', "
            "group_size=32); hemat.load_for_inference(root + '/mla', 'int8'); hemat.from_pretrained(root + '/mla'); "
            "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "False False"


def test_the_sdpa_backend_probe_is_a_constant_to_the_compiler():
    from hemat.model import mla

    compiled = torch.compile(lambda x: x + len(mla.sdpa_backend(8, 8, "torch.float32", "cpu", False)), fullgraph=True)
    assert compiled(torch.zeros(2)).tolist() == [len(mla.sdpa_backend(8, 8, "torch.float32", "cpu", False))] * 2
