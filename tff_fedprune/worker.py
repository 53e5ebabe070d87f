"""`python -m tff_fedprune.worker`: the TFF worker service (`runtime.worker`)."""

from absl import app

from tff_fedprune.runtime import worker

if __name__ == '__main__':
  app.run(worker.main)
