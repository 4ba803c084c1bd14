"""A rank of a data-parallel test run: `torchrun ... tests/distributed_side.py DUMP headstart-train-args...`
runs `headstart train ARGS` as this rank (what `torchrun -m headstart train ARGS` does), and then
each rank but rank 0 writes the weights its model ended with to DUMP/rank<r>.safetensors (rank 0
writes the run folder's last.safetensors), so that the test can compare them. Run by
tests/test_distributed.py, never by pytest itself."""

import os
import sys

from headstart import cli
from headstart.io.formats.safetensors import write_safetensors
from headstart.training import run as training

dump, args = sys.argv[1], sys.argv[2:]
fit = training.fit


def fit_and_dump(model, *a, **kw):
    result = fit(model, *a, **kw)
    if int(os.environ["RANK"]):  # (rank 0's model is the best epoch's by now; its last is on disk)
        write_safetensors(f"{dump}/rank{os.environ['RANK']}.safetensors",
                          {k: v.detach().contiguous() for k, v in model.state_dict().items()}, {})
    return result


training.fit = fit_and_dump
sys.exit(cli.main(args))
