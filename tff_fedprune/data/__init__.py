"""Real federated data: sources, partitions and per-client tf.data pipelines."""

from tff_fedprune.data.federated import FederatedData
from tff_fedprune.data.federated import federate
from tff_fedprune.data.partitions import PARTITIONS
from tff_fedprune.data.partitions import PartitionError
from tff_fedprune.data.sources import DataSourceError
from tff_fedprune.data.sources import ImageSource
from tff_fedprune.data.sources import LabelledImages
from tff_fedprune.data.sources import load_source
from tff_fedprune.data.sources import SOURCES
