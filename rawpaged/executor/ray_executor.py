"""RayExecutor (`--distributed-executor-backend ray`): one Ray actor per rank in a placement group.

As vLLM's Ray executor: a placement group reserves one bundle per rank ({"GPU": 1, "CPU": 1} on
GPUs, {"CPU": 1} on the CPU backend), each rank is an actor pinned to its bundle, and a step's
inputs are put in Ray's object store once and read by every rank. On GPUs the group is PACKed
(ranks may span nodes; NCCL connects them); CPU ranks share memory, so their group is STRICT_PACK
(one node).

Connects to the Ray cluster of RAY_ADDRESS (or the running one, or starts a local one). The actors
are owned by this driver: Ray ends them when it exits. A rank whose actor dies, or whose call
raises, is an error naming it; the others are killed and the placement group removed.
"""
from __future__ import annotations

import dataclasses
import os

from rawpaged.errors import RawpagedError
from rawpaged.executor.distributed import DistributedExecutor, RankHost

PLACEMENT_TIMEOUT_S = float(os.environ.get("RAWPAGED_RAY_PLACEMENT_TIMEOUT", "120"))


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RawpagedError(f"the ray executor needs Ray (pip install 'rawpaged[ray]'): {e}") from None
    return ray


def ensure_ray(ray) -> None:
    """Join RAY_ADDRESS's cluster, the one this process already joined, or start a local one."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)


def ray_device(ray, device: str) -> str:
    """'auto' on a Ray cluster: cuda when the cluster has GPUs (the driver itself may have none)."""
    if device != "auto":
        return device
    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


class RayExecutor(DistributedExecutor):
    kind = "ray"

    def _start(self) -> None:
        ray = self.ray = import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ensure_ray(ray)
        device = ray_device(ray, self.config.device)
        config = dataclasses.replace(self.config, device=device)
        gpu = device == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self._remove_pg = remove_placement_group
        self.pg = placement_group([dict(bundle) for _ in range(self.size)],
                                  strategy="PACK" if gpu else "STRICT_PACK")
        self.actors = []
        ready, _ = ray.wait([self.pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            self._stop()
            raise RawpagedError(f"Ray could not place {self.size} ranks of {bundle} within {PLACEMENT_TIMEOUT_S:.0f} s "
                                f"(cluster resources: {ray.cluster_resources()}); a CPU group must fit one node")
        actor_class = ray.remote(RankHost)
        # NOTE: the driver's sys.path travels to the actors, so an uninstalled checkout works too.
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in _import_roots() if p)}}
        for rank in range(self.size):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)
            self.actors.append(actor_class.options(
                num_cpus=1, num_gpus=1 if gpu else 0, scheduling_strategy=strategy, max_restarts=0,
                runtime_env=env, name=None).remote(rank, self.size, None))
        self._start_ranks(self.comm_kind(device), config, self.model_config)

    def _device_index(self, rank: int) -> int | None:
        return None           # NOTE: Ray gives each actor its GPU as device 0 (CUDA_VISIBLE_DEVICES)

    def pids(self) -> list[int]:
        return self._call_all("pid")

    # -- calls ---------------------------------------------------------------------------------
    def _call_all_per_rank(self, method: str, args_of) -> list:
        self._check_usable()
        ray = self.ray
        refs, shared = [], {}
        for rank, actor in enumerate(self.actors):
            args = args_of(rank)
            if len(args) == 1 and hasattr(args[0], "batch"):       # a step: into the object store once
                key = id(args[0])
                if key not in shared:
                    shared[key] = (args[0], ray.put(args[0]))
                args = (shared[key][1],)
            refs.append(getattr(actor, method).remote(*args))
        return self._wait_all(refs)

    def _call_one(self, rank: int, method: str, *args):
        self._check_usable()
        return self._wait_all([getattr(self.actors[rank], method).remote(*args)], first_rank=rank)[0]

    def _wait_all(self, refs: list, first_rank: int = 0) -> list:
        """Each rank's result; the first rank to die or raise stops them all (no waiting on the
        others, which may be stuck in a collective with it)."""
        ray = self.ray
        rank_of = {ref: first_rank + i for i, ref in enumerate(refs)}
        results = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._fail(f"tensor-parallel worker rank {rank} (Ray actor) died: {_first_line(e)}")
                except ray.exceptions.RayTaskError as e:
                    self._fail(f"tensor-parallel worker rank {rank} failed: {_first_line(e.cause or e)}")
        return [results[r] for r in sorted(results)]

    def _stop(self) -> None:
        ray = getattr(self, "ray", None)
        if ray is None:
            return
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:              # noqa: BLE001 - already gone
                pass
        self.actors = []
        pg = getattr(self, "pg", None)
        if pg is not None:
            try:
                self._remove_pg(pg)
            except Exception:              # noqa: BLE001
                pass
            self.pg = None


def _import_roots() -> list[str]:
    """Where rawpaged and model_impl are imported from (their parent folders)."""
    import model_impl
    import rawpaged
    roots = [os.path.dirname(os.path.dirname(os.path.abspath(m.__file__))) for m in (rawpaged, model_impl)]
    extra = os.environ.get("PYTHONPATH", "")
    return list(dict.fromkeys(roots + extra.split(os.pathsep)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
