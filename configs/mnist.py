r"""MNIST, the paper's setting: 17 workers, 8 Byzantine, mu2sgd, CTMA over cwtm.

From TFDS (prepared once with `tfds build mnist --file_format=array_record`):
  python main.py --config configs/mnist.py --workdir /tmp/ftjax/mnist
From a local mnist.npz (train_images uint8 [60000, 28, 28, 1], train_labels,
test_images, test_labels; no TFDS needed, see docs/data.md):
  python main.py --config configs/mnist.py:mnist.npz --workdir /tmp/ftjax/mnist
"""

try:
  from configs import default  # a checkout
except ImportError:
  from ftjax.configs import default  # installed with ftjax


def get_config(arg=None):
  """MNIST config; ``arg`` is an optional path to an .npz file."""
  c = default.get_config()
  c.num_steps = 1000
  c.eval_every = 50
  if arg:
    c.data.name = "npz"
    c.data.path = arg
  else:
    c.data.name = "mnist"
  c.model.name = "simple_mnist"
  return c
