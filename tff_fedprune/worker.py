"""`python -m tff_fedprune.worker`: the TFF worker service (`runtime.worker`)."""

from tff_fedprune import cli
from tff_fedprune.runtime import worker

if __name__ == '__main__':
  cli.run(worker.main)
