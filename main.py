r"""Train and evaluate one run from a config: the checkout's form of ftjax train.

  python main.py --config configs/default.py --workdir /tmp/ftjax/default \
    --config.workers.num=17 --config.aggregator.name=cwtm \
    --config.aggregator.meta=ctma --config.attack.name=alie

Running the same command again with the same --workdir resumes from the latest
checkpoint. python main.py --help lists the flags (ftjax/commands.py).
"""

import sys

from ftjax import commands

if __name__ == "__main__":
  commands.train(sys.argv, command="python main.py")
