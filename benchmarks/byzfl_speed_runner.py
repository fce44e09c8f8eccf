"""One timed training of ByzFL's README example, in its own process (driven by
benchmarks/byzfl_speed.py).

``--lib=byzfl`` runs under the peers' Python (torch, byzfl): ByzFL's own
classes (``Client``, ``Server``, ``ByzantineClient``, ``DataDistributor``)
wired as its README's program wires them (in the names of the installed
version, which needs ``store_per_client_metrics`` and calls the server's step
``update_model_with_gradients``), on the MNIST arrays of ``--mnist``
(a .npz, normalised as torchvision's ``Normalize((0.1307,), (0.3081,))``),
without the test evaluations. ``--lib=ftjax`` runs ftjax's sweep config
``configs/sweeps/byzfl_readme.py`` (seed 1) through ``train_and_evaluate``.

ByzFL's rate is ``--steps`` rounds over their wall time after ``--warmup``
rounds; ftjax's is its own timer over one compiled chunk of ``--steps``
rounds (compilation and the evaluation at the end excluded, and reported as
overhead). Prints one JSON line. With ``--curve_every=N`` it runs ByzFL's
program for ``--seed`` instead and prints its test accuracy every N rounds:

  /path/to/peers/python benchmarks/byzfl_speed_runner.py --lib=byzfl \
    --mnist=mnist.npz --steps=1000 --curve_every=100 --seed=42
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _byzfl_modules():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import types
  # byzfl/__init__ imports its benchmark package (torchvision); the federated
  # framework does not need it, so the package is entered without running it.
  spec = importlib.util.find_spec("byzfl")
  pkg = types.ModuleType("byzfl")
  pkg.__path__ = list(spec.submodule_search_locations)
  sys.modules["byzfl"] = pkg
  from byzfl import fed_framework  # pylint: disable=g-import-not-at-top
  from byzfl.utils import misc
  return fed_framework, misc


def _mnist_datasets(path, torch):
  arrays = np.load(path)

  class Split(torch.utils.data.TensorDataset):
    def __init__(self, images, labels):
      x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
      super().__init__((x - 0.1307) / 0.3081, torch.from_numpy(labels.astype(np.int64)))
      self.targets = self.tensors[1]  # what DataDistributor reads

  return (Split(arrays["train_images"], arrays["train_labels"]),
          Split(arrays["test_images"], arrays["test_labels"]))


def byzfl(args):
  """(rounds timer) for ByzFL's README program."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  fw, misc = _byzfl_modules()
  misc.set_random_seed(args.seed)
  train, test = _mnist_datasets(args.mnist, torch)
  loaders = fw.DataDistributor({
      "data_distribution_name": "dirichlet_niid", "distribution_parameter": 0.5,
      "nb_honest": 3, "data_loader": torch.utils.data.DataLoader(train, shuffle=True),
      "batch_size": 25}).split_data()
  clients = [fw.Client({"model_name": "cnn_mnist", "device": "cpu", "loss_name": "NLLLoss",
                        "LabelFlipping": False, "training_dataloader": loaders[i],
                        "momentum": 0.9, "nb_labels": 10,
                        "store_per_client_metrics": False}) for i in range(3)]
  server = fw.Server({
      "device": "cpu", "model_name": "cnn_mnist",
      "test_loader": torch.utils.data.DataLoader(test, batch_size=25),
      "optimizer_name": "SGD", "learning_rate": 0.1, "weight_decay": 0.0001,
      "milestones": [1000], "learning_rate_decay": 0.25,
      "aggregator_info": {"name": "TrMean", "parameters": {"f": 1}},
      "pre_agg_list": [{"name": "Clipping", "parameters": {"c": 2.0}},
                       {"name": "NNM", "parameters": {"f": 1}}]})
  byz = fw.ByzantineClient({"name": "InnerProductManipulation", "f": 1,
                            "parameters": {"tau": 3.0}})

  def rounds(n):
    for _ in range(n):  # the README's loop body, without its evaluation every 100 steps
      state = server.get_dict_parameters()
      for client in clients:
        client.set_model_state(state)
      for client in clients:
        client.compute_gradients()
      honest = [client.get_flat_gradients_with_momentum() for client in clients]
      server.update_model_with_gradients(honest + byz.apply_attack(honest))

  return rounds, lambda: float(server.compute_test_accuracy())


def ftjax(args):
  """(rounds timer) for ftjax's sweep config of the same example."""
  sys.path.insert(0, ROOT)
  from ftjax import sweep_spec, train  # pylint: disable=g-import-not-at-top
  spec = sweep_spec.load_config_file(f"configs/sweeps/byzfl_readme.py:{args.mnist}")
  config = sweep_spec.expand(spec).cells[0].runs[0].config
  config.progress, config.checkpoint.enabled = False, False
  workdir = tempfile.mkdtemp(prefix="ftjax_byzfl_speed_")
  result = {}

  def rounds(n):
    # One run of n rounds, evaluated once at its end; ftjax's own timer
    # (steps_per_sec) leaves out compilation and the evaluation.
    config.num_steps = config.eval_every = n
    done = train.train_and_evaluate(config, os.path.join(workdir, str(len(result))))
    result[len(result)] = done.metrics

  def accuracy():
    return float(result[len(result) - 1]["test_acc"])

  return rounds, accuracy, result


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--lib", choices=("byzfl", "ftjax"), required=True)
  p.add_argument("--mnist", required=True)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--seed", type=int, default=42, help="ByzFL's seed (its README's: 42)")
  p.add_argument("--curve_every", type=int, default=0,
                 help="instead of timing, train --steps rounds of ByzFL and print the test "
                      "accuracy after every this many (the README's printout)")
  args = p.parse_args()
  if args.curve_every:
    rounds, accuracy = byzfl(args)
    curve = {}
    for step in range(args.curve_every, args.steps + 1, args.curve_every):
      rounds(args.curve_every)
      curve[step] = accuracy()
      print(json.dumps({"lib": "byzfl", "seed": args.seed, "step": step,
                        "test_acc": curve[step]}), flush=True)
    return
  t0 = time.perf_counter()
  if args.lib == "byzfl":
    rounds, accuracy = byzfl(args)
  else:
    rounds, accuracy, result = ftjax(args)
  t1 = time.perf_counter()
  out = {"lib": args.lib, "setup_s": t1 - t0, "steps": args.steps}
  if args.lib == "byzfl":
    rounds(args.warmup)
    t2 = time.perf_counter()
    rounds(args.steps)
    t3 = time.perf_counter()
    out.update(steps_per_sec=args.steps / (t3 - t2), overhead_s=t2 - t1)
  else:
    # ftjax's own timer leaves out compilation and the evaluation at the end;
    # the rest of the run's wall time is reported as overhead.
    rounds(args.steps)
    t3 = time.perf_counter()
    rate = result[0]["steps_per_sec"]
    out.update(steps_per_sec=rate, overhead_s=(t3 - t1) - args.steps / rate)
  out.update(load1=os.getloadavg()[0], final_acc=accuracy())
  print(json.dumps(out))


if __name__ == "__main__":
  main()
