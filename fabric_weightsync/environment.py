"""Which launched process trains and which one is an inference worker, and the trainers-only world Fabric sees."""

from dataclasses import dataclass

from lightning.fabric.plugins.environments import ClusterEnvironment
from typing_extensions import override


@dataclass(frozen=True)
class ProcessLayout:
    """On every node, local ranks ``[0, devices)`` train and ``[devices, devices + workers_per_node)`` are workers.

    The same rule holds in every launch mode, so ``torchrun --nproc-per-node=devices+workers`` and
    ``srun --ntasks-per-node=devices+workers`` need no extra configuration.
    """

    devices: int
    workers_per_node: int
    num_nodes: int = 1

    @property
    def processes_per_node(self) -> int:
        return self.devices + self.workers_per_node

    @property
    def num_workers(self) -> int:
        return self.workers_per_node * self.num_nodes

    def is_worker(self, local_rank: int) -> bool:
        if not 0 <= local_rank < self.processes_per_node:
            raise ValueError(
                f"Local rank {local_rank} is outside the {self.processes_per_node} processes per node this layout"
                f" expects ({self.devices} training + {self.workers_per_node} inference workers)"
            )
        return local_rank >= self.devices

    def worker_id(self, node_rank: int, local_rank: int) -> int:
        return node_rank * self.workers_per_node + local_rank - self.devices

    def launch_rank(self, node_rank: int, local_rank: int) -> int:
        return node_rank * self.processes_per_node + local_rank

    def node_of(self, worker_id: int) -> int:
        """The node worker ``worker_id`` runs on."""
        return worker_id // self.workers_per_node

    def node_workers(self, node_rank: int) -> range:
        """The ids of the workers on node ``node_rank``."""
        return range(node_rank * self.workers_per_node, (node_rank + 1) * self.workers_per_node)

    def node_sender(self, node_rank: int) -> int:
        """The global training rank of node ``node_rank``'s local training rank 0, which serves that node's workers."""
        return node_rank * self.devices


class TrainingWorldEnvironment(ClusterEnvironment):
    """Wraps the detected cluster environment so that Fabric's world is the training processes only.

    Launchers (torchrun, SLURM, or ours) count ``devices + workers`` processes per node; this environment reports
    ``num_nodes * devices`` as the world size and ``node_rank * devices + local_rank`` as the global rank of a
    training process, so ``fabric.world_size``, DDP, collectives, barriers and samplers ignore the workers.
    """

    def __init__(self, inner: ClusterEnvironment, layout: ProcessLayout) -> None:
        super().__init__()
        self.inner = inner
        self.layout = layout

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return self.inner.creates_processes_externally

    @property
    @override
    def main_address(self) -> str:
        return self.inner.main_address

    @property
    @override
    def main_port(self) -> int:
        return self.inner.main_port

    @staticmethod
    @override
    def detect() -> bool:
        return False

    @override
    def world_size(self) -> int:
        return self.layout.num_nodes * self.layout.devices

    @override
    def set_world_size(self, size: int) -> None:
        pass  # derived from the layout

    @override
    def global_rank(self) -> int:
        return self.node_rank() * self.layout.devices + self.local_rank()

    @override
    def set_global_rank(self, rank: int) -> None:
        pass  # derived from the layout

    @override
    def local_rank(self) -> int:
        return self.inner.local_rank()

    @override
    def node_rank(self) -> int:
        return self.inner.node_rank()

    @override
    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        self.inner.validate_settings(num_devices=num_devices, num_nodes=num_nodes)

    @override
    def teardown(self) -> None:
        self.inner.teardown()
