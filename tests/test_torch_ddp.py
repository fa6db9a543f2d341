"""A converted model under DistributedDataParallel: two processes on the gloo backend (CPU), each
on half of every batch, end where one process on the full batches ends."""
import pytest

torch = pytest.importorskip("torch")
frt = pytest.importorskip("fastrelu.torch")
nn = torch.nn

STEPS, BATCH, WORLD = 3, 8, 2


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.PReLU(6),
                                  nn.Conv2d(6, 6, 3, padding=1), nn.LeakyReLU(0.1))
        self.head = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 8, 8, generator=gen), torch.randint(0, 4, (BATCH,),
                                                                          generator=gen))
            for _ in range(STEPS)]


def train(model, shard=slice(None)):
    """SGD steps on (a shard of) each batch; returns how many times fastrelu's PReLU ran."""
    calls = []
    original = frt.fastrelu.prelu_backward
    frt.fastrelu.prelu_backward = lambda *a, **k: calls.append(1) or original(*a, **k)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    try:
        for x, y in batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
            opt.step()
    finally:
        frt.fastrelu.prelu_backward = original
    return len(calls)


def ddp_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    frt.CROSSOVER["cpu"].update(dict.fromkeys(frt.CROSSOVER["cpu"], 0))  # small tensors too
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=WORLD)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(frt.convert(CNN()))
    # each rank takes an equal half: DDP's mean of the ranks' mean gradients is the full batch's
    calls = train(model, slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD))
    torch.save({"state": model.module.state_dict(), "calls": calls}, f"{out_dir}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_on_the_full_batch(tmp_path, monkeypatch):
    torch.multiprocessing.spawn(ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=WORLD)
    for op in frt.CROSSOVER["cpu"]:
        monkeypatch.setitem(frt.CROSSOVER["cpu"], op, 0)
    torch.manual_seed(0)
    single = frt.convert(CNN())
    assert train(single) == STEPS
    expected = single.state_dict()
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["calls"] == STEPS
        assert list(result["state"]) == list(expected)
        for name, value in result["state"].items():
            torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
