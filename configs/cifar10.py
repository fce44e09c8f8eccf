r"""CIFAR-10 with the simple conv net (default) or ResNet-18 (`:resnet18`).

  python main.py --config configs/cifar10.py --workdir /tmp/ftjax/cifar10
  python main.py --config configs/cifar10.py:resnet18 --workdir /tmp/ftjax/cifar10_resnet18

Needs the TFDS cifar10 dataset prepared once (`tfds build cifar10 --file_format=array_record`).
Training augmentation (random crop 32 with padding 2, horizontal flip) is on.
"""

try:
  from configs import default  # a checkout
except ImportError:
  from ftjax.configs import default  # installed with ftjax


def get_config(arg=None):
  """CIFAR-10 config; ``arg`` picks the model: "simple" (default) or "resnet18"."""
  arg = arg or "simple"
  models = {"simple": "simple_cifar10", "resnet18": "resnet18"}
  if arg not in models:
    raise ValueError(f"Unknown cifar10 config variant {arg!r}; valid: {', '.join(models)}.")
  c = default.get_config()
  c.data.name = "cifar10"
  c.model.name = models[arg]
  c.num_steps = 5000
  c.eval_every = 250
  c.data.eval_batch_size = 500
  return c
