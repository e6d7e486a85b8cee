"""Independent single-thread training runs of a learning test, two at a time.

The learning tests compare a pre-trained backbone with a random one; each run is single-threaded
(``torch.set_num_threads(1)``, which is also what makes its figures repeatable), so on the 2-core CI
machine two runs side by side take the time of one. Each run goes to a fresh *spawned* process (no
forked torch state), so its result is the one it would have in the test process: the same seeds,
the same single thread.
"""
import concurrent.futures
import multiprocessing


def _one_thread():
    import torch
    torch.set_num_threads(1)


def run_side_by_side(fn, calls, processes=2):
    """``[fn(*args) for args in calls]``, computed in ``processes`` spawned one-thread processes.

    ``fn`` must be importable by name (a module-level function of a module on ``sys.path``) and return
    something picklable. Exceptions of a run are raised here.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=context,
                                                initializer=_one_thread) as pool:
        return list(pool.map(fn, *zip(*calls)))
