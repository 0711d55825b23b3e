"""An ordinary Horovod PyTorch training script: an MLP on scikit-learn's digits (offline, 8x8 images).

The three lines marked ``# ranger_hvd`` are all it takes to run it with ``ranger-hvd launch`` /
``sweep`` (``examples/torch.yaml``): the compressor comes from the run's config, and the logged
metrics land in the run's metrics.jsonl for ``report``.  Without them it is plain Horovod:

    horovodrun -np 2 -H localhost:2 python examples/torch_digits.py --epochs 5
"""

import argparse

import horovod.torch as hvd
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import ranger_hvd.run  # ranger_hvd

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--batch-size", type=int, default=32)
args = parser.parse_args()

hvd.init()
torch.manual_seed(0)
torch.set_num_threads(1)

# the data: 20% held out, the rest split across the ranks
x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
order = np.random.RandomState(0).permutation(len(x))
x, y = x[order], y[order]
n_eval = len(x) // 5
x_eval, y_eval = torch.from_numpy(x[:n_eval]), torch.from_numpy(y[:n_eval])
x_train, y_train = x[n_eval:][hvd.rank()::hvd.size()], y[n_eval:][hvd.rank()::hvd.size()]
steps_per_epoch = (len(x) - n_eval) // hvd.size() // args.batch_size   # the same on every rank

model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=ranger_hvd.run.compression())  # ranger_hvd
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

step = 0
for epoch in range(args.epochs):
    batches = np.random.RandomState(1000 * epoch + hvd.rank()).permutation(len(x_train))
    for i in range(steps_per_epoch):
        idx = batches[i * args.batch_size:(i + 1) * args.batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(torch.from_numpy(x_train[idx])), torch.from_numpy(y_train[idx]))
        loss.backward()
        optimizer.step()
        step += 1
    with torch.no_grad():
        logits = model(x_eval)
        eval_loss = F.cross_entropy(logits, y_eval).item()
        eval_accuracy = (logits.argmax(1) == y_eval).float().mean().item()
    if hvd.rank() == 0:
        print(f"epoch {epoch}: loss {loss.item():.4f} eval_accuracy {eval_accuracy:.4f}", flush=True)
    ranger_hvd.run.log(step, epoch=epoch, loss=loss.item(), eval_loss=eval_loss, eval_accuracy=eval_accuracy)  # ranger_hvd
