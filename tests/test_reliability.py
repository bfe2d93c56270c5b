"""examples/benchmarks/reliability.py, the parts that run without a GPU: each bad-checkpoint
mutation breaks what it says, and the reader names what is broken."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vllm_atom.checkpoint import load_checkpoint
from vllm_atom.config import AtomConfig
from vllm_atom.format import check_linear_tensors, linear_layout
from vllm_atom.quantize import QuantizeOptions, quantize

from test_quantize import make_tiny  # noqa: E402  (tests/ is on sys.path under pytest)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "benchmarks"))
import reliability  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    src = make_tiny(root / "llama")
    quantize(src, root / "q", src / "calib.txt", AtomConfig(), QuantizeOptions(nsamples=2, seqlen=64), progress=False)
    return root / "q"


@pytest.mark.parametrize("mutation", ["missing-tensor", "wrong-shape", "wrong-dtype"])
def test_tensor_mutations_are_named_by_the_checker(ckpt, tmp_path, mutation):
    cfg, _, good = load_checkpoint(ckpt)
    expect = reliability.write_mutated(ckpt, tmp_path / "bad", mutation)
    _, _, bad = load_checkpoint(tmp_path / "bad")
    prefix = expect.rsplit(".", 1)[0]
    assert set(good) - set(bad) == ({expect} if mutation == "missing-tensor" else set())
    k = good[f"{prefix}.reorder_index"].numel()
    n = good[f"{prefix}.w_scale"].shape[0]
    check_linear_tensors(prefix, good, linear_layout(k, n, cfg, 1))  # the original passes
    with pytest.raises(ValueError, match=expect.replace(".", r"\.")):
        check_linear_tensors(prefix, bad, linear_layout(k, n, cfg, 1))


def test_reorder_mutation_is_not_a_permutation(ckpt, tmp_path):
    reliability.write_mutated(ckpt, tmp_path / "bad", "reorder-not-a-permutation")
    _, _, t = load_checkpoint(tmp_path / "bad")
    names = [f"model.layers.0.self_attn.{p}_proj.reorder_index" for p in "qkv"]
    for k in names:
        idx = t[k].long()
        assert torch.unique(idx).numel() < idx.numel()
        assert torch.equal(idx, t[names[0]].long())  # q/k/v still share one (broken) reorder
    o = t["model.layers.0.self_attn.o_proj.reorder_index"].long()
    assert torch.unique(o).numel() == o.numel()  # only the one broken


def test_config_mutations(ckpt, tmp_path):
    reliability.write_mutated(ckpt, tmp_path / "fv", "unknown-format-version")
    with pytest.raises(ValueError, match="format_version"):
        load_checkpoint(tmp_path / "fv")
    reliability.write_mutated(ckpt, tmp_path / "rs", "row-shards-not-tp")
    q = json.loads((tmp_path / "rs" / "config.json").read_text())["quantization_config"]
    assert q["row_shards"] == 2 and AtomConfig.from_dict(q).row_shards == 2


def test_bad_request_bodies_cover_the_issue_list():
    bodies = reliability.bad_request_bodies("m")
    assert len(bodies["prompt-longer-than-max-model-len"]["prompt"]) > reliability.MAX_MODEL_LEN
    with pytest.raises(UnicodeDecodeError):
        bodies["not-utf8"].decode("utf-8")
    assert {"max-tokens-huge", "max-tokens-negative", "logprobs-out-of-range", "empty-prompt"} <= set(bodies)


OOM_LOG = """========= COMPUTE-SANITIZER
FAILED tests/gpu/test_sm90.py::test_atom_linear_sm90[default-64-llama2-7b-o] - torch.OutOfMemoryError: CUDA out
FAILED tests/gpu/test_sm90.py::test_atom_linear_sm90[default-64-llama3-8b-qkv] - torch.AcceleratorError: CUDA e...
========= Program hit cudaErrorMemoryAllocation (error 2) due to "out of memory" on CUDA API call to cudaMalloc.
2 failed, 38 passed in 61.2s
========= ERROR SUMMARY: 4 errors
"""
OOB_LOG = """========= Invalid __global__ read of size 16 bytes
=========     at w4a4_sm90+0x1a30 in w4a4_sm90.cu:212
=========     by thread (5,0,0) in block (3,0,0)
========= Program hit cudaErrorMemoryAllocation (error 2) due to "out of memory" on CUDA API call to cudaMalloc.
FAILED tests/gpu/test_sm90.py::test_atom_linear_sm90[default-64-llama2-7b-o] - RuntimeError: CUDA error
1 failed, 39 passed in 61.2s
========= ERROR SUMMARY: 2 errors
"""


def test_sanitizer_log_parsing_and_oom_retry():
    """A memcheck log gives pytest's counts and the distinct error lines; only a chunk whose every
    failure is out of memory gets its failed tests run again alone (an access error never)."""
    s = reliability._sanitizer_shard(OOM_LOG, 40, 99)
    assert (s["passed"], s["failed"], s["memcheck"]) == (38, 2, "========= ERROR SUMMARY: 4 errors")
    assert reliability._oom_only(OOM_LOG, s) == ["tests/gpu/test_sm90.py::test_atom_linear_sm90[default-64-llama2-7b-o]",
                                                 "tests/gpu/test_sm90.py::test_atom_linear_sm90[default-64-llama3-8b-qkv]"]
    s = reliability._sanitizer_shard(OOB_LOG, 40, 99)
    assert s["errors"]["Invalid __global__ read of size 16 bytes"] == 1
    assert "at w4a4_sm90+0x.. in w4a4_sm90.cu:212" in s["errors"]
    assert reliability._oom_only(OOB_LOG, s) == []
    clean_log = "40 passed in 30.0s\n========= ERROR SUMMARY: 0 errors\n"
    clean = reliability._sanitizer_shard(clean_log, 40, 0)
    assert clean["passed"] == 40 and reliability._oom_only(clean_log, clean) == []


def test_sanitizer_resume_keeps_clean_chunks_and_runs_the_rest():
    """--sanitizer-resume keeps the earlier run's clean chunks (mapped onto the collected tests by
    position) and leaves for this run the killed, unstarted and out-of-memory-retried ones; a
    record of another selection is refused, never silently reused."""
    ids = [f"t::{i}" for i in range(100)]
    earlier = {"selection": "sel", "tests": 100, "commit": "abc",
               "shards": [{"rc": 0, "tests": 30}, {"rc": 99, "tests": 30, "retried_as": 4},
                          {"rc": None, "tests": 30}, {"rc": 0, "tests": 10}, {"rc": 0, "tests": 2}]}
    kept, spans = reliability._sanitizer_spans(earlier, ids, "sel")
    assert [(s["start"], s["tests"], s["commit"]) for s in kept] == [(0, 30, "abc"), (90, 10, "abc")]
    assert spans == [(30, 90)]
    again, spans = reliability._sanitizer_spans({**earlier, "shards": kept + [{"rc": 0, "tests": 60, "start": 30}]},
                                                ids, "sel")
    assert spans == [] and sum(s["tests"] for s in again) == 100
    with pytest.raises(ValueError, match="not this selection"):
        reliability._sanitizer_spans(earlier, ids[:99], "sel")


def test_sanitizer_record_names_the_part_it_reads_and_writes(tmp_path, monkeypatch):
    """--sanitizer-record X: the sanitizer run resumes from and writes part X, and leaves the
    record of the first run (part "sanitizer") as it was."""
    seen = []

    def fake_part(args, out, previous):
        seen.append(previous)
        return {"ok": True, "tests": 3}

    monkeypatch.setattr(reliability, "part_sanitizer", fake_part)
    monkeypatch.setattr(reliability.e2e, "gpu_info", lambda: ("NVIDIA H200", 1))
    monkeypatch.setattr(reliability.e2e, "vllm_version", lambda: "0.26.0")
    path = tmp_path / "reliability-h200.json"
    path.write_text(json.dumps({"parts": {"sanitizer": {"ok": True, "tests": 1764},
                                          "sanitizer-lean": {"ok": False, "tests": 2}}}))
    rc = reliability.main(["--parts", "sanitizer", "--sanitizer-record", "sanitizer-lean", "--out", str(tmp_path),
                           "--work", str(tmp_path / "w")])
    parts = json.loads(path.read_text())["parts"]
    assert rc == 0 and seen == [{"ok": False, "tests": 2}]
    assert parts["sanitizer"] == {"ok": True, "tests": 1764} and parts["sanitizer-lean"]["tests"] == 3


def test_sanitizer_ids_file_is_the_selection(tmp_path, monkeypatch):
    """--sanitizer-ids FILE: exactly those tests, in chunks, the selection named by the file's hash
    (so --sanitizer-resume continues only a record of the same list)."""
    ids = [f"tests/gpu/test_sm90.py::test_atom_linear_sm90[default-{m}-llama2-7b-o]" for m in (1, 16, 64)]
    (tmp_path / "rest.ids").write_text("\n".join(ids) + "\n\n")
    launched, popen = [], reliability.subprocess.Popen

    class Done:
        pid, returncode = 2 ** 22 + 7, 0  # (no such process group: finish() kills nothing)

        def __new__(cls, cmd, *a, **kw):  # memcheck runs are faked, everything else (git) is real
            return super().__new__(cls) if cmd[0] == "compute-sanitizer" else popen(cmd, *a, **kw)

        def __init__(self, cmd, stdout, **kw):
            launched.append(cmd[cmd.index("no:cacheprovider") + 1:])
            stdout.write(f"{len(launched[-1])} passed in 1.0s\n========= ERROR SUMMARY: 0 errors\n")

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(reliability.subprocess, "Popen", Done)
    monkeypatch.setattr(reliability, "gpu_memory_mib", lambda q: None)
    monkeypatch.setattr(reliability, "_gpu_mib_by_group", lambda: {})
    monkeypatch.setattr(reliability.time, "sleep", lambda s: None)
    args = reliability.parse_args(["--sanitizer-ids", str(tmp_path / "rest.ids"), "--sanitizer-chunk", "2"])
    r = reliability.part_sanitizer(args, tmp_path)
    assert launched == [ids[:2], ids[2:]]
    assert r["ok"] and (r["tests"], r["passed"], r["memcheck_errors"]) == (3, 3, 0)
    assert r["selection"].startswith("ids rest.ids (sha1 ")
