"""`lorakit ARGS` as a process of its own, forked from one server process that imported torch, transformers and
every command once (seconds each on a loaded 2-core machine) instead of once per call. Each call is still a real
separate process: its own environment and LORAKIT_FAULT (lorakit.faults.arm), its own session (a `killpg` fault
kills it and what it started, nothing of the tests), stdout and stderr to files, killed alone by SIGKILL.

Tests that look at what a fresh interpreter prints while importing (test_cli_feedback) start `python -m lorakit`
themselves instead.

    python cli_forks.py      the server: reads one JSON job a line {"argv", "env", "out", "err"}, forks it,
                             prints {"pid"} at once and {"code"} (minus the signal if killed) when it ends
"""
import atexit
import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve() -> None:
    import transformers.models.llama.modeling_llama  # noqa: F401  (the tiny models' class, loaded lazily otherwise)

    from lorakit.cli.main import build_parser, main
    from lorakit import faults
    import lorakit.train.loop  # noqa: F401

    build_parser()  # imports every command's module
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.environ.clear()
                os.environ.update(job["env"])
                faults.arm(job["env"].get("LORAKIT_FAULT"))
                for fd, path in ((1, job["out"]), (2, job["err"])):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                    os.dup2(f, fd)
                    os.close(f)
                os.chdir(job["cwd"])
                sys.argv = ["lorakit", *job["argv"]]
                code = main(job["argv"])
            except SystemExit as e:  # argparse's exits
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        print(json.dumps({"code": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}), flush=True)


class Forks:
    """The client: run(argv, env, timeout) -> subprocess.CompletedProcess, as subprocess.run would give."""

    def __init__(self, tmp: Path):
        self.tmp, self.n = Path(tmp), 0
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
        env.pop("LORAKIT_FAULT", None)
        self.err = open(self.tmp / "server.err", "w+")
        self.p = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=env, cwd=ROOT)

    def _line(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        line = self.p.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def run(self, argv: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        self.p.stdin.write(json.dumps({"argv": argv, "env": env, "out": str(out), "err": str(err),
                                       "cwd": str(ROOT)}) + "\n")
        self.p.stdin.flush()
        started = self._line(120)  # the server's own imports come first, once
        if started is None:
            self.err.seek(0)
            raise AssertionError(f"the lorakit fork server did not start a process: {self.err.read()[-3000:]}")
        done = self._line(timeout)
        if done is None:
            os.kill(started["pid"], signal.SIGKILL)
            self._line(30)
            raise subprocess.TimeoutExpired(["lorakit", *argv], timeout)
        return subprocess.CompletedProcess(["lorakit", *argv], done["code"], out.read_text(), err.read_text())

    def close(self) -> None:
        import shutil

        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


_FORKS: list[Forks] = []


def run(argv: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """One server for the whole test session, started on first use."""
    if not _FORKS:
        import tempfile

        _FORKS.append(Forks(Path(tempfile.mkdtemp(prefix="lorakit-forks-"))))
        atexit.register(_FORKS[0].close)
    return _FORKS[0].run(argv, env, timeout)


if __name__ == "__main__":
    serve()
