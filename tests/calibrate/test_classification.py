"""calibrate.classification: shuffled epochs of labelled examples."""

import torch

from slimtorch.calibrate.classification import epoch_batches


def test_epoch_batches_cover_every_item_once_per_epoch():
    inputs, labels = torch.arange(10).float(), torch.arange(10)
    gen = torch.Generator().manual_seed(0)
    batches = list(epoch_batches(inputs, labels, steps=8, batch_size=3, gen=gen))
    sizes = [len(y) for _, y in batches]
    assert sizes == [3, 3, 3, 1, 3, 3, 3, 1]
    first = torch.cat([y for _, y in batches[:4]])
    second = torch.cat([y for _, y in batches[4:]])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)  # reshuffled
    assert all(torch.equal(x.long(), y) for x, y in batches)  # pairs stay together
