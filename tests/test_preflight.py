"""The preflight: a grid its cluster cannot run is refused before anything starts, one line
per problem naming run, field, value and a fix; the memory estimate behind it."""

from __future__ import annotations

import pytest

from helpers import REPO, run_cli, run_here
from launcher.grid import load_grid
from launcher.preflight import ClusterFacts, Node, NodeProblem, check_grid
from sparsity_scaling.config import load_config
from sparsity_scaling.costs import MemoryEstimate

GRIDS = REPO / "configs" / "grids"
MODELS = REPO / "configs" / "models"
H100_NODES = ClusterFacts.target(nodes=1, gpus_per_node=8, gpu_memory=80e9)
GPU_RESOURCES = "resources: {tp: 1, dp: 8, cpus_per_worker: 8, gpus_per_worker: 1}\n"


def _grid(tmp_path, text: str):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["sparsing_law", "width_depth"])
def test_the_paper_grids_pass_the_preflight_on_80GB_8_gpu_nodes(name):
    grid = load_grid(GRIDS / f"{name}.yaml")
    assert check_grid(grid, H100_NODES) == []
    assert check_grid(grid, ClusterFacts.target(nodes=4, gpus_per_node=8, gpu_memory=80e9, cpus_per_node=128)) == []


def test_the_cpu_grids_pass_and_their_memory_is_not_held_against_a_gpu():
    for name in ("cpu_test", "demo", "decay"):
        assert check_grid(load_grid(GRIDS / f"{name}.yaml"), H100_NODES) == [], name
        assert check_grid(load_grid(GRIDS / f"{name}.yaml"), ClusterFacts.target(1, 0, 0, cpus_per_node=2)) == [], name


def test_grid_plan_refuses_every_run_that_cannot_split_its_batch_one_line_each(tmp_path):
    # 0.1b: 327,680 tokens / 4,096 = 80 sequences; dp 8 x micro 4 = 32 does not divide 80,
    # 80 / 8 = 10 per rank, so micro 2 or 5 would
    grid = _grid(tmp_path, f"name: g\nbase: {MODELS / '0.1b.yaml'}\n"
                           "axes: [{zipped: {label: [a, b], train.lr: [0.01, 0.02]}}]\n"
                           "overrides: {train.micro_batch_size: 4}\n" + GPU_RESOURCES + "evaluation: {gpus: 1}\n")
    result = run_here("grid", "plan", str(grid))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and "1 node, 8 GPUs of 80 GB per node" in lines[0] and "2 problems" in lines[0]
    for run, line in zip("ab", lines[1:]):
        assert line.strip() == (f"run {run}: train.micro_batch_size 4: dp 8 x micro 4 = 32 does not divide the 80 "
                                "sequences of a batch (train.batch_tokens 327680 / seq 4096); use micro_batch_size 2 or 5")
    row = next(line for line in result.stdout.splitlines() if line.startswith("a "))
    assert "train.micro_batch_size" in row  # the table's preflight column
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.yaml"]  # nothing written


def test_a_data_parallel_size_that_cannot_split_the_batch_names_resources_dp(tmp_path):
    grid = load_grid(_grid(tmp_path, f"name: g\nbase: {MODELS / '0.1b.yaml'}\n"
                                     "resources: {dp: 3, gpus_per_worker: 1}\nevaluation: {gpus: 1}\n"))
    (problem,) = check_grid(grid, H100_NODES)
    assert (problem.run, problem.field, problem.value) == ("run", "resources.dp", 3)
    assert problem.line().startswith("run run: resources.dp 3: does not divide the 80 sequences of a batch")
    assert "use dp 2 or 4" in problem.line()


def test_grid_plan_refuses_a_run_that_cannot_fit_its_gpu_and_names_a_fix_that_does(tmp_path):
    grid = _grid(tmp_path, f"name: g\nbase: {MODELS / '2.4b.yaml'}\naxes: [{{zipped: {{label: [big], "
                           "train.activation_checkpointing: [false]}}]\n" + GPU_RESOURCES + "evaluation: {gpus: 1}\n")
    result = run_here("grid", "plan", str(grid))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert lines[1].strip().startswith("run big: train.micro_batch_size 4: estimated peak ")
    assert "exceeds the 80 GB of a GPU" in lines[1] and "train.activation_checkpointing: true" in lines[1]
    assert run_here("grid", "plan", str(grid), "--gpu-memory", "200").returncode == 0  # the flag is the limit


def test_the_memory_estimate_matches_a_hand_count():
    """0.1b (d 768, 16 layers, 12 heads, d_ff 1920, ReLU) in bf16 at micro 2 x seq 4096, vocab
    16384, zero_stage 0 (which bf16 trains as ZeRO 1: the optimizer state split over dp 8),
    tp 1, counted by hand from the README's formula."""
    config = load_config(MODELS / "0.1b.yaml", ["train.micro_batch_size=2"])
    params = 16 * (4 * 768**2 + 3 * 768 * 1920 + 2 * 768) + 768 + 16384 * 768  # 121,135,872
    per_token_per_layer = 2 * 12 * 768 + 5 * 2 * 768 + 4 * 12 + 3 * 2 * 1920  # 37,680 bytes
    tokens = 2 * 4096
    estimate = MemoryEstimate.of(config, vocab_size=16384, dp=8, bf16=True, on_gpu=True)
    assert estimate.weights == 2 * params == 242_271_744
    assert estimate.gradients == 6 * params == 726_815_232
    assert estimate.optimizer == 12 * params // 8 == 181_703_808
    assert estimate.activations == 16 * per_token_per_layer * tokens == 4_938_792_960
    assert estimate.logits == (12 * 768 + 6 * 16384) * tokens == 880_803_840
    assert estimate.total == 8_970_387_584  # with the 2 GB runtime allowance
    fp32 = MemoryEstimate.of(config, vocab_size=16384, dp=8, bf16=False, on_gpu=True)
    assert fp32.optimizer == 8 * params  # fp32 at ZeRO 0: the two moments, on every rank

    # 2.4b SiLU, tp 2 x dp 4, ZeRO 2, activation checkpointing, micro 4: every share split
    config = load_config(MODELS / "2.4b.yaml", ["model.activation=silu", "parallel.tp=2", "train.zero_stage=2"])
    half = (42 * (4 * 2240**2 + 3 * 2240 * 5600 + 2 * 2240) + 2240 + 16384 * 2240) // 2  # 1,230,195,680 per tp rank
    estimate = MemoryEstimate.of(config, vocab_size=16384, dp=4, bf16=True, on_gpu=True)
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (2 * half, 6 * half // 4, 12 * half // 4)
    block = 2 * 12 * 2240 + 5 * 2 * 2240 // 2 + 4 * 28 // 2 + 4 * 2 * 5600 // 2  # 87,416 bytes, recomputed once
    assert estimate.activations == (42 * 2 * 2240 + block) * 4 * 4096 == 4_515_037_184
    assert estimate.logits == (12 * 2240 + 6 * 16384 // 2) * 4 * 4096


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("bf16", [False, True])
def test_the_activation_estimate_is_what_a_real_forward_pass_keeps_for_backward(world_of_one, activation, bf16):
    """The bytes of every tensor autograd saves in a forward pass of the model on CPU (each
    storage once, weights left out), against the estimate's activations and logits less the
    bf16 logits the cast frees (they are counted as a transient of the peak)."""
    import torch

    from sparsity_scaling.model import MiniCPM

    config = load_config(MODELS / "micro.yaml", [f"model.activation={activation}", "model.d_model=128",
                                                 "model.n_layers=3", "model.d_ff=320"])
    torch.manual_seed(0)
    model = MiniCPM(config.model, 512).to(torch.bfloat16 if bf16 else torch.float32).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    micro, seq = 4, 128
    tokens = torch.randint(0, 512, (micro, seq + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.token_losses(tokens[:, :-1], tokens[:, 1:])
    config = config.model_copy(update={"train": config.train.model_copy(update={"micro_batch_size": micro}),
                                       "data": config.data.model_copy(update={"seq_len": seq})})
    estimate = MemoryEstimate.of(config, vocab_size=512, dp=1, bf16=bf16, on_gpu=False)
    kept = estimate.activations + estimate.logits - (2 * 512 * micro * seq if bf16 else 0)
    assert sum(saved.values()) == pytest.approx(kept, rel=0.06)


def test_evaluation_on_cpus_is_refused_for_a_grid_that_trains_on_gpus(tmp_path):
    text = f"name: g\nbase: {MODELS / '0.4b.yaml'}\n" + GPU_RESOURCES
    (problem,) = check_grid(load_grid(_grid(tmp_path, text)), H100_NODES)
    assert (problem.run, problem.field, problem.value) == (None, "evaluation.gpus", 0)
    assert "set evaluation.gpus: 1" in problem.line()
    assert check_grid(load_grid(_grid(tmp_path, text + "evaluation: {gpus: 0.5}\n")), H100_NODES) == []


def test_a_loopback_tracking_uri_is_refused_when_the_cluster_has_more_than_one_node():
    grid = load_grid(GRIDS / "sparsing_law.yaml")
    nodes = (Node(128, 8, 80_000_000_000),) * 2
    for uri in ("http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000"):
        (problem,) = check_grid(grid, ClusterFacts(nodes, connected=True, tracking_uri=uri))
        assert problem.line().startswith(f"tracking URI {uri}: a loopback address") and "MLFLOW_TRACKING_URI" in problem.line()
        assert check_grid(grid, ClusterFacts(nodes[:1], connected=True, tracking_uri=uri)) == []  # one node reaches it
    assert check_grid(grid, ClusterFacts(nodes, connected=True, tracking_uri="http://10.1.2.3:5000")) == []


def test_what_some_nodes_do_not_see_is_refused():
    unseen = NodeProblem("10.0.0.2", "f00dfeed" * 7, "/home/me/runs/g", "not the directory the driver sees")
    cluster = ClusterFacts((Node(128, 8, 80_000_000_000),) * 2, connected=True, node_problems=(unseen,))
    (problem,) = check_grid(load_grid(GRIDS / "sparsing_law.yaml"), cluster)
    assert problem.line() == ("node 10.0.0.2 (f00dfeedf00d) /home/me/runs/g: not the directory the driver sees; "
                              "put the workdir and corpora on storage every node mounts at the same path, and serve "
                              "MLflow where every node reaches it")


def test_nodes_of_one_host_share_its_loopback():
    """Raylets of one machine (ray.cluster_utils, or several per host) share its IP: a loopback
    server reaches all of them."""
    nodes = (Node(128, 8, 80_000_000_000),) * 2
    grid = load_grid(GRIDS / "sparsing_law.yaml")
    assert check_grid(grid, ClusterFacts(nodes, connected=True, hosts=1, tracking_uri="http://127.0.0.1:5000")) == []
    (problem,) = check_grid(grid, ClusterFacts(nodes, connected=True, hosts=2, tracking_uri="sqlite:///w/mlflow.db"))
    assert "SQLite" in problem.line()


def test_resources_no_node_has_are_refused():
    cpu_only = ClusterFacts((Node(4, 0),), connected=True)
    lines = [p.line() for p in check_grid(load_grid(GRIDS / "sparsing_law.yaml"), cpu_only)]
    assert any(line.startswith("resources: no node has 8 CPUs and 1 GPUs for one worker") for line in lines)
    assert any(line.startswith("evaluation.gpus 1: no node has that many GPUs (the most on one node: 0)") for line in lines)
    assert not any("estimated peak" in line for line in lines)  # no GPU to hold it against


def test_a_ray_node_s_gpu_memory_comes_from_its_accelerator_type_else_the_flag():
    assert Node.of_ray({"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}) == Node(192, 8, 80_000_000_000)
    assert Node.of_ray({"CPU": 192, "GPU": 8, "accelerator_type:H200": 1}, 40e9).gpu_memory == 141_000_000_000
    assert Node.of_ray({"CPU": 64, "GPU": 4, "accelerator_type:A100": 1}, 40e9).gpu_memory == 40_000_000_000
    assert Node.of_ray({"CPU": 8}).gpu_memory is None
