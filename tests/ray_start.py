"""Starting a local Ray cluster for a test module, robust to a slow start on a busy CI machine.

Ray gives a starting node 30 s to register with its GCS and then raises "The current node timed out
during startup"; on a loaded 2-core machine that happens now and then. The start is retried (after
a shutdown of what came up) a few times before the test errors.
"""

from __future__ import annotations

import time


def start_local_ray(num_cpus: int, attempts: int = 3) -> None:
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            ray.shutdown()
            time.sleep(2 * attempt)
