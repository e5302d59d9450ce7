import itertools
from pathlib import Path

import pytest
import torch
from scipy.optimize import minimize

from quantkit.alloc.baq import baq_allocate, baq_rates, predicted_losses
from quantkit.alloc.ip import ip_allocate
from quantkit.alloc.pareto import frontier, pareto_allocate
from quantkit.alloc.table import as_table, tie, total
from quantkit.errors import QuantkitError
from quantkit.stats.sensitivity import fisher_price, hessian_price


def random_table(L, O=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randint(1, 5, (L,), generator=g).double() * 8
    bits = torch.tensor([2, 3, 4, 8][:O], dtype=torch.float64)
    size = weights[:, None] * bits + torch.randint(0, 4, (L, O), generator=g)  # + overhead
    sens = torch.rand(L, generator=g, dtype=torch.float64) * 10
    cost = sens[:, None] * torch.pow(2.0, -2 * bits) * weights[:, None] * (1 + 0.3 * torch.rand(L, O, generator=g, dtype=torch.float64))
    return as_table(cost, size, weights)


def brute_force(table, bpw, bops=None, bops_budget=None):
    L, O = table.cost.shape
    budget = table.budget_bits(bpw)
    combos = torch.tensor(list(itertools.product(range(O), repeat=L)))
    c = table.cost.gather(1, combos.t()).sum(0)
    s = table.size.gather(1, combos.t()).sum(0)
    c[s > budget + 1e-6] = float("inf")
    if bops is not None:
        c[bops.gather(1, combos.t()).sum(0) > bops_budget + 1e-6] = float("inf")
    i = int(c.argmin())
    return float(c[i]), combos[i]


@pytest.mark.parametrize("seed", range(6))
def test_ip_and_dp_equal_brute_force(seed):
    L = [3, 5, 7, 8, 10, 10][seed]
    table = random_table(L, seed=seed)
    for bpw in (2.2, 2.7, 3.3, 4.1, 5.5, 7.0):
        try:
            table.check_feasible(bpw)
        except QuantkitError:
            continue
        want, _ = brute_force(table, bpw)
        for alloc in (ip_allocate, pareto_allocate):
            choice = alloc(table, bpw)
            cost, size = total(table, choice)
            assert size <= table.budget_bits(bpw) + 1e-6
            assert cost == pytest.approx(want, rel=1e-9), alloc.__name__


@pytest.mark.parametrize("seed", range(3))
def test_ip_bops_constraint_equals_brute_force(seed):
    """A second budget (compute: bit-operations, here weights x bits^2) binds where the size
    budget alone would not; the ip optimum under both equals enumeration under both."""
    table = random_table(7, seed=seed)
    bops = table.weights[:, None] * torch.tensor([2.0, 3.0, 4.0, 8.0]) ** 2
    bpw = 6.0
    free = ip_allocate(table, bpw)
    cap = 0.7 * float(bops.gather(1, free[:, None]).sum())     # binds: the free optimum breaks it
    choice = ip_allocate(table, bpw, bops=bops, bops_budget=cap)
    assert float(bops.gather(1, choice[:, None]).sum()) <= cap + 1e-6
    assert total(table, choice)[0] == pytest.approx(brute_force(table, bpw, bops, cap)[0], rel=1e-9)
    assert total(table, choice)[0] > total(table, free)[0]


def test_frontier_monotone_and_max_budget_gives_max_bits():
    table = random_table(10, seed=3)
    f = frontier(table)
    finite = f.cost[torch.isfinite(f.cost)]
    assert torch.all(finite[1:] <= finite[:-1])
    top = table.size.max(1).values.sum() / table.weights.sum()
    for alloc in (ip_allocate, pareto_allocate, baq_allocate):
        assert torch.equal(alloc(table, float(top) + 0.5), torch.full((10,), 3))


@pytest.mark.parametrize("seed", range(4))
def test_frontier_on_a_coarse_grid_never_exceeds_its_capacities(seed):
    """Sizes with no useful gcd (odd overheads, a few grid steps): every frontier point's true
    size fits the capacity it is reported for, and the allocation its budget."""
    table = random_table(8, seed=seed)
    table.size += torch.rand(table.size.shape, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64) * 7                  # non-integer sizes
    f = frontier(table, steps=97)
    assert f.unit != round(f.unit)                                      # not a gcd grid
    for c in range(0, len(f.cost), 5):
        if torch.isfinite(f.cost[c]):
            choice = f.choice(c)
            assert float(table.size.gather(1, choice[:, None]).sum()) <= c * f.unit + 1e-6
            assert float(table.cost.gather(1, choice[:, None]).sum()) == pytest.approx(float(f.cost[c]))
    lo = float(table.size.min(1).values.sum() / table.weights.sum())
    for bpw in (lo + 0.3, lo + 1.0, lo + 2.5):
        assert table.bits_per_weight(pareto_allocate(table, bpw)) <= bpw + 1e-9


def test_infeasible_budget_names_the_range():
    with pytest.raises(QuantkitError, match="smallest feasible budget"):
        ip_allocate(random_table(5), 1.0)


def test_tied_layers_share_an_option_at_the_tied_optimum():
    table = random_table(7, seed=1)
    groups = [["l0", "l1", "l2"], ["l3"], ["l4", "l5"], ["l6"]]
    tied, rows = tie(table, groups)
    assert torch.equal(tied.weights.sum(), table.weights.sum()) and tied.layers[0] == "l0+l1+l2"
    for bpw in (2.7, 3.5, 4.5):
        want = min(c for c, s in _tied_combos(table, groups) if s <= table.budget_bits(bpw) + 1e-6)
        for alloc in (ip_allocate, pareto_allocate, baq_allocate):
            choice = alloc(tied, bpw)[rows]
            assert choice[0] == choice[1] == choice[2] and choice[4] == choice[5]
            cost, size = total(table, choice)
            assert size <= table.budget_bits(bpw) + 1e-6
            if alloc is not baq_allocate:
                assert cost == pytest.approx(want, rel=1e-9), alloc.__name__


def _tied_combos(table, groups):
    """(cost, size) of every choice that gives each group one option, by enumeration."""
    index = {n: i for i, n in enumerate(table.layers)}
    for combo in itertools.product(range(table.cost.shape[1]), repeat=len(groups)):
        choice = torch.empty(len(table.layers), dtype=torch.long)
        for g, o in zip(groups, combo):
            choice[[index[n] for n in g]] = o
        yield total(table, choice)


@pytest.mark.parametrize("seed", range(5))
def test_baq_closed_form_matches_convex_solver(seed):
    g = torch.Generator().manual_seed(seed)
    L = 8
    loss = torch.rand(L, generator=g, dtype=torch.float64) * 10 + 0.1
    n = torch.randint(1, 10, (L,), generator=g).double()
    rate, theta = 3.0, 1.95
    closed = baq_rates(loss, n, rate, theta)
    f = lambda r: float((loss * 2.0 ** (-theta * (torch.tensor(r) - rate))).sum())  # noqa: E731
    res = minimize(f, x0=[rate] * L, method="SLSQP", tol=1e-14,
                   constraints=[{"type": "eq", "fun": lambda r: float((n * torch.tensor(r)).sum() - n.sum() * rate)}])
    assert torch.allclose(closed, torch.tensor(res.x), atol=1e-6)
    per_weight = predicted_losses(loss, closed, rate, theta) / n
    assert torch.allclose(per_weight, per_weight.mean().expand(L), rtol=1e-9)  # equal-loss structure


def test_baq_rounding_holds_budget_and_is_near_ip():
    gaps = []
    for seed in range(8):
        table = random_table(10, seed=seed)
        for bpw in (2.5, 3.0, 3.5, 4.25):
            choice = baq_allocate(table, bpw)
            cost, size = total(table, choice)
            assert size <= table.budget_bits(bpw) + 1e-6
            best, _ = total(table, ip_allocate(table, bpw))
            gaps.append(cost / best - 1)
    assert max(gaps) < 0.25 and sum(gaps) / len(gaps) < 0.05, (max(gaps), sum(gaps) / len(gaps))


def test_hutchinson_exact_on_diagonal_with_one_sample():
    from quantkit.stats.hutchinson import hutchinson_trace
    d = torch.rand(30, dtype=torch.float64) * 5
    est, k = hutchinson_trace(lambda v: d * v, 30, max_samples=1)
    assert k == 1 and est == pytest.approx(float(d.sum()), rel=1e-12)


def test_hutchinson_within_5_percent_on_random_spd():
    from quantkit.stats.hutchinson import hutchinson_trace
    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 50, generator=g, dtype=torch.float64)
    H = A @ A.T + torch.eye(50, dtype=torch.float64)
    est, k = hutchinson_trace(lambda v: H @ v, 50, tol=1e-4, min_samples=200, max_samples=5000, generator=g)
    assert abs(est / float(H.trace()) - 1) < 0.05


def test_loss_hessian_traces_match_exact_on_a_tiny_model():
    import transformers as tf

    from quantkit.stats.hutchinson import loss_hessian_traces
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = tf.LlamaForCausalLM(cfg).double().eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.down_proj"
    est = loss_hessian_traces(model, ids, [name], tol=1e-5, max_samples=2000)[name]
    mod = model.get_submodule(name)
    w = mod.weight
    w.requires_grad_(True)
    logits = model(ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    g = torch.autograd.grad(loss, w, create_graph=True)[0].flatten()
    exact = sum(float(torch.autograd.grad(g[i], w, retain_graph=True)[0].flatten()[i])
                for i in range(g.numel()))
    assert abs(est / exact - 1) < 0.05


def test_cost_tables_price_more_bits_as_cheaper_errors():
    from quantkit.model.discovery import find_blocks, linears
    from quantkit.quant.base import QSpec
    from quantkit.quant.rtn import rtn
    from quantkit.stats.sensitivity import cost_table, kl_table
    from tests.conftest import tiny_model, token_batches
    model = tiny_model("llama")
    prefix, blocks = find_blocks(model)
    names = [f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n in linears(b)]
    options = [QSpec(bits=b, group_size=32) for b in (2, 4, 8)]
    batches = token_batches()
    for table in (cost_table(model, batches, options, rtn, torch.device("cpu"), progress=False),
                  kl_table(model, batches[0], names, options, rtn, progress=False)):
        assert table.layers == names
        assert torch.all(table.cost >= 0) and torch.all(table.cost[:, 0] > table.cost[:, 2])
        assert torch.all(table.size[:, 0] < table.size[:, 1]) and torch.all(table.size[:, 1] < table.size[:, 2])
    # the table is built on the unquantized model: weights are left as they were
    assert torch.equal(model.get_submodule(names[0]).weight, tiny_model("llama").get_submodule(names[0]).weight)


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq-baq", "nupes", "llm-int8"])
def test_storage_floors_from_shapes_equal_the_packed_sizes(method):
    """The early budget check prices layers from their shapes alone: exactly what the packed
    layers store (formats without g_idx / outlier columns), never more than they do."""
    import functools
    import quantkit.pipeline  # noqa: F401  (registers every method)
    from quantkit import registry
    from quantkit.quant.base import QSpec, storage_floor
    from quantkit.stats.sensitivity import cost_table
    from tests.conftest import tiny_model, token_batches
    model = tiny_model("llama")
    options = [QSpec(bits=b, group_size=g, sym=sym) for b, g, sym in
               ((2, 32, False), (3, -1, False), (4, 48, True), (8, 32, False))]
    compressor = registry.get("compressor", method)
    def sizes(**kw):
        quantizer = functools.partial(compressor, **kw)
        return cost_table(model, token_batches(), options, quantizer, torch.device("cpu"), progress=False).size
    size = sizes(threshold=float("inf")) if method == "llm-int8" else sizes()
    names = [n for n, _ in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
    floor = torch.tensor([[storage_floor(compressor, *model.get_submodule(n).weight.shape, s)
                           for s in options] for n in names], dtype=torch.float64)
    assert torch.equal(size, floor)
    if method == "llm-int8":      # threshold 0: every layer keeps outlier columns in fp16 at 8 bits
        assert torch.all(sizes(threshold=0.0)[:, 3] > floor[:, 3])


def test_cost_table_uses_the_first_calibration_windows():
    from quantkit.pipeline import first_samples
    batches = [torch.arange(8 * 3).reshape(8, 3), torch.arange(8 * 3).reshape(8, 3) + 100]
    got = first_samples(batches, 10)
    assert [len(b) for b in got] == [8, 2] and torch.equal(got[1], batches[1][:2])
    assert sum(len(b) for b in first_samples(batches, 99)) == 16


def test_prices_are_the_output_errors_on_the_calibration_tokens():
    """hessian: mean over tokens of ||E x||²; fisher: the same per output row, weighted by the
    row's output Fisher. Written from explicit tokens X, not from H."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 8, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)
    E = torch.randn(5, 8, generator=g, dtype=torch.float64)
    H = X.T @ X / 50
    out = X @ E.T                                        # [tokens, rows]: the output errors
    assert hessian_price("l", E, H) == pytest.approx(float((out ** 2).sum(1).mean()), rel=1e-9)
    rw = torch.rand(5, generator=g, dtype=torch.float64)
    assert fisher_price({"l": rw})("l", E, H) == pytest.approx(float(((out ** 2) * rw).sum(1).mean()), rel=1e-9)


def test_uniform_allocator_gives_every_layer_the_widest_option_that_fits():
    from quantkit.alloc.uniform import uniform
    table = random_table(6, seed=2)
    avg = table.size.sum(0) / table.weights.sum()                     # per option, all layers
    for o in range(4):
        budget = float(avg[o]) + 1e-6
        assert torch.equal(uniform(table, budget), torch.full((6,), o))
        assert table.bits_per_weight(uniform(table, budget)) <= budget
    assert uniform.needs_table is False                               # the pipeline plans it directly


@pytest.mark.parametrize("chunk", [128, 4])
def test_fisher_table_prices_every_position_but_each_windows_first(chunk, monkeypatch):
    """fisher's cost: Σ_o F_o (E H Eᵀ)_oo with F = mean g² of the loss w.r.t. the layer's
    outputs (the first two batches, as the table takes them) and H = mean x xᵀ of its inputs
    (every batch), both over every position but each window's first (the attention sink):
    written here from explicit tokens and gradients of the whole window's logits. Every window
    starts with one token whose embedding points along one axis, so that leaving position 0 in
    either F or H shows. The loss's head runs on `chunk` positions at a time (4: chunks of
    15 predicted positions 4, 4, 4, 3)."""
    from quantkit.quant.rtn import rtn
    from quantkit.stats import sensitivity
    from quantkit.stats.sensitivity import fisher_table
    monkeypatch.setattr(sensitivity, "LOSS_CHUNK", chunk)
    from quantkit.types import QSpec
    from tests.conftest import tiny_model, token_batches
    model = tiny_model("llama")
    batches = token_batches(n=6, seqlen=16, batch=2)
    for ids in batches:
        ids[:, 0] = 7
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[7] = 0
        emb[7, 3] = 1.0
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and n.endswith("_proj")]
    name = "model.layers.0.self_attn.v_proj"
    options = [QSpec(bits=b, group_size=32) for b in (2, 4)]
    table = fisher_table(model, batches, names, options, rtn, torch.device("cpu"), False)
    mod = model.get_submodule(name)
    xs, gs = [], []
    h1 = mod.register_forward_hook(lambda _m, i, _o: xs.append(i[0].detach()))
    h2 = mod.register_full_backward_hook(lambda _m, _gi, go: gs.append(go[0].detach()))
    for ids in batches[:2]:
        logits = model(ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                          ids[:, 1:].reshape(-1), reduction="sum").backward()
    with torch.no_grad():
        for ids in batches[2:]:
            model(ids, use_cache=False)
    h1.remove(), h2.remove()
    model.zero_grad()
    W = mod.weight.detach()
    row = table.layers.index(name)

    def priced(x_from, g_from):
        x = torch.cat([x[:, x_from:].reshape(-1, x.shape[-1]) for x in xs]).double()
        g = torch.cat([g[:, g_from:].reshape(-1, g.shape[-1]) for g in gs]).double()
        H = x.T @ x / len(x)
        F = g.pow(2).sum(0) / sum(ids[:, 1:].numel() for ids in batches[:2])
        return [float((F * ((E @ H) * E).sum(1)).sum())
                for E in (W.double() - rtn(W, None, s).dequantize().double() for s in options)]

    got = table.cost[row].tolist()
    assert got == pytest.approx(priced(1, 1), rel=1e-4)
    for wrong in (priced(0, 1), priced(1, 0)):                # the sink's inputs, or its gradients
        assert all(abs(a / b - 1) > 1e-2 for a, b in zip(got, wrong))


def test_fisher_keeps_block_inputs_on_disk_when_memory_is_short(monkeypatch):
    """The block-by-block Fisher of a model in memory keeps every block's inputs in memory,
    or in files when they would take a quarter of the free memory: the same sums either way,
    the files gone afterwards; the model's parameters keep their requires_grad and get no grad."""
    import tempfile
    from quantkit.model import runner
    from quantkit.stats import sensitivity
    from tests.conftest import tiny_model, token_batches
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    names = [n for n, m in model.named_modules() if n.endswith("_proj")]
    batches = token_batches(n=4, seqlen=16, batch=1)
    dirs = []
    orig = runner.Offload.keep

    def keep(self, tensors, device):
        dirs.append(self.dir)
        return orig(self, tensors, device)
    monkeypatch.setattr(runner.Offload, "keep", keep)
    in_memory = sensitivity.output_fisher(model, batches, names)
    assert dirs and all(d is None for d in dirs)
    monkeypatch.setattr(sensitivity, "available_memory", lambda: 1000)
    dirs.clear()
    on_disk = sensitivity.output_fisher(model, batches, names)
    assert dirs and all(d is not None for d in dirs)
    assert not any(Path(d).exists() for d in dirs)
    assert Path(dirs[0]).parent == Path(tempfile.gettempdir())
    assert in_memory.keys() == on_disk.keys() == set(names)
    assert all(torch.equal(in_memory[n], on_disk[n]) and in_memory[n].abs().sum() > 0 for n in names)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
