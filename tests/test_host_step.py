"""The host optimizer step of a stage offloaded with its optimizer state: torch's fused CPU
kernel in place of the per-parameter loop torch picks on the CPU, the same updates, and the
user's own settings wherever the user made them."""

import copy

import pytest
import torch

from autopart.runtime.stage.host_step import fuse_host_step
from multirank import run_ranks


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
        lambda p: torch.optim.Adam(p, lr=1e-2),
        lambda p: torch.optim.Adagrad(p, lr=0.1),
    ],
)
def test_the_fused_host_step_makes_the_same_updates(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    plain = copy.deepcopy(model)
    fused, reference = make(model.parameters()), make(plain.parameters())
    for step in range(3):
        x = torch.randn(4, 16)
        for m in (model, plain):
            m(x).pow(2).sum().backward()
        if step == 1:  # mid-training, over state the loop made (a resume does this)
            assert fuse_host_step(fused) == [0]
        fused.step(), reference.step()
        fused.zero_grad(), reference.zero_grad()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_users_choices_and_other_optimizers_are_left_alone():
    params = [torch.nn.Parameter(torch.randn(4))]
    assert fuse_host_step(torch.optim.SGD(params, lr=0.1, foreach=False)) == []
    assert fuse_host_step(torch.optim.Adam(params, lr=0.1, foreach=True)) == []
    assert fuse_host_step(torch.optim.RMSprop(params, lr=0.1)) == []
    assert (
        fuse_host_step(torch.optim.SGD([torch.nn.Parameter(torch.randn(2, device="meta"))], lr=1))
        == []
    )


def test_a_sparse_gradient_goes_back_to_the_users_implementation():
    table = torch.nn.Embedding(8, 4, sparse=True)
    opt = torch.optim.SGD(table.parameters(), lr=0.1)
    assert fuse_host_step(opt) == [0]
    table(torch.tensor([1, 2])).sum().backward()
    before = table.weight.detach().clone()
    opt.step()
    assert opt.param_groups[0]["fused"] is None
    assert not torch.equal(before, table.weight)


def _offloaded_step(rank: int, world: int) -> None:
    import autopart
    from zoo import ZOO

    model, args, _ = ZOO["mlp"]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapped = autopart.Module(model, opt, offload=True, cost="analytic")
    x = args[0].repeat(4, 1)
    wrapped(x).pow(2).mean().backward()
    seen = []
    opt.register_step_pre_hook(lambda o, *_: seen.append(o.param_groups[0]["fused"]))
    opt.step()
    assert seen == [True], "the host step did not run the fused kernel"
    saved = wrapped.optimizer_state_dict()
    assert saved["param_groups"][0]["fused"] is None, "the state dict must say what the user chose"
    wrapped.load_optimizer_state_dict(saved)
    assert opt.param_groups[0]["fused"] is True, "loading the user's settings undid the fused step"


@pytest.mark.multirank
def test_an_offloaded_stage_steps_with_the_fused_kernel():
    run_ranks(1, _offloaded_step)
