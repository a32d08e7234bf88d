"""What IPython's reset between two steps costs in the shared kernel, with its output cache (IPython's default) and without (fruitflow's).

    python benchmarks/kernel_reset.py [--rounds 6]

One shared kernel (`fruitflow.notebooks.Kernel`, all five steps' modules imported and warmed, as a run has it).
Each round a cell builds and runs a small Keras model (a step's leftovers: objects with reference cycles), then
the reset `Kernel.take` does between steps is timed from outside, as the flow waits for it: once with the output
cache on (`displayhook.do_full_cache = 1`, what `InteractiveShell.cache_size` > 0 gives: its flush ends in a full
`gc.collect()`) and once off (`NO_OUTPUT_CACHE`), alternating which goes first. Prints the medians and the
saving for a run's four resets.
"""
import argparse, statistics, tempfile, time
from pathlib import Path

LEFTOVERS = "import keras, numpy as np\nm = keras.Sequential([keras.Input((32,)), keras.layers.Dense(8)]); m.compile('adam', 'mse'); m.predict(np.zeros((4, 32)), verbose=0)"
RESET = "get_ipython().reset(new_session=True)"  # what Kernel.take runs

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    from fruitflow.notebooks import Kernel
    def run(km, code: str):
        "Run `code` in the kernel of `km` and wait for it, as `Kernel.take` does (jupyter_client's blocking client)."
        kc = km.blocking_client(); kc.start_channels()
        try: assert kc.execute(code, silent=True, reply=True, timeout=120)["content"]["status"] == "ok", code
        finally: kc.stop_channels()
    with tempfile.TemporaryDirectory() as d:
        k = Kernel(Path(d)); km = k.take(600)
        times = {1: [], 0: []}
        for i in range(a.rounds):
            for cache in ((1, 0) if i % 2 == 0 else (0, 1)):
                run(km, f"get_ipython().displayhook.do_full_cache = {cache}\n" + LEFTOVERS)
                t = time.perf_counter(); run(km, RESET); times[cache].append(time.perf_counter() - t)
        k.stop(now=True)
    on, off = (statistics.median(times[c]) for c in (1, 0))
    print(f"reset, {a.rounds} rounds: with the output cache {on:.3f} s (median; {' '.join(f'{x:.2f}' for x in times[1])}),"
          f" without {off:.3f} s ({' '.join(f'{x:.2f}' for x in times[0])}); a run's 4 resets: {4 * (on - off):.2f} s less")
