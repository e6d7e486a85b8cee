"""run.sh launches: with several nodes, per-key evaluations run alone on each node (local rendezvous,
as official), while pre-training and fine-tuning span the nodes (``--nnodes``)."""
import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path, *argv, nodes=2, node_id=1):
    """Run run.sh with a stub ``torchrun`` and a stub Python that record their arguments, one line per call."""
    record = tmp_path / "calls.txt"
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("torchrun", "stubpython"):
        stub = bindir / name
        stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{record}"\n')
        stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", PYTHON=str(bindir / "stubpython"),
               TOTAL_NODES=str(nodes), NODE_ID=str(node_id), OUTPUT_DIR=str(tmp_path / "out"), TORCHRUN="torchrun")
    proc = subprocess.run(["bash", str(REPO / "run.sh"), *argv], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in record.read_text().splitlines()] if record.exists() else []


def test_per_key_evaluations_run_alone_on_their_node(tmp_path):
    """Keys teacher,student on 2 nodes: node 1 evaluates 'student' only, with a one-node rendezvous."""
    calls = _run(tmp_path, "imagenet_knn", "job", "vit_small", "teacher,student", "16")
    assert len(calls) == 1
    call = calls[0]
    assert call[0] == "torchrun" and "--nnodes" in call and call[call.index("--nnodes") + 1] == "1"
    assert "2" not in [call[i + 1] for i, a in enumerate(call) if a == "--nnodes"]
    assert call[call.index("--master_addr") + 1] == "127.0.0.1"
    assert call[call.index("--checkpoint_key") + 1] == "student"
    assert call[call.index("--nproc_per_node") + 1] == "8"


def test_pretraining_spans_the_nodes(tmp_path):
    """Pre-training launches with --nnodes 2 --node_rank 1 and the shared master address."""
    calls = _run(tmp_path, "imagenet_pretrain", "job", "vit_small", "teacher", "16")
    assert len(calls) == 1 and calls[0][0] == "torchrun"
    call = calls[0]
    assert call[call.index("--nnodes") + 1] == "2" and call[call.index("--node_rank") + 1] == "1"
    assert "main_ibot.py" in call


def test_fine_tuning_spans_the_nodes_for_every_key(tmp_path):
    """Transfer fine-tuning: both keys run on node 1 too, each with --nnodes 2."""
    calls = [c for c in _run(tmp_path, "cifar10_cls", "job", "vit_small", "teacher,student", "16")
             if c[0] == "torchrun"]
    assert [c[c.index("--checkpoint_key") + 1] for c in calls] == ["teacher", "student"]
    assert all(c[c.index("--nnodes") + 1] == "2" and c[c.index("--node_rank") + 1] == "1" for c in calls)


def test_cpu_runs_one_plain_process(tmp_path):
    """GPUS=0: no launcher, the script runs in one plain process."""
    calls = _run(tmp_path, "imagenet_knn", "job", "vit_small", "teacher", "0", nodes=1, node_id=0)
    assert len(calls) == 1 and calls[0][0] == "stubpython" and calls[0][1] == "evaluation/eval_knn.py"
