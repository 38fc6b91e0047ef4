"""host_malloc: a script re-executes itself once with glibc's malloc tunables; in-process callers never do."""
import os
import subprocess
import sys
import textwrap

import pytest

from mesh_transformer import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ":".join(f"{name}={value}" for name, value in host_malloc.TUNABLES.items())
needs_tunables = pytest.mark.skipif(not host_malloc.tunables_possible(), reason="needs Linux and glibc >= 2.35")


def test_env_adds_the_tunables_once_and_keeps_the_users():
    if not host_malloc.tunables_possible():
        assert host_malloc.malloc_env({}) is None
        return
    assert host_malloc.malloc_env({})["GLIBC_TUNABLES"] == ALL
    env = host_malloc.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:" + ALL
    assert host_malloc.malloc_env({"GLIBC_TUNABLES": ALL}) is None  # already set: no loop
    env = host_malloc.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=4"})
    tunables = env["GLIBC_TUNABLES"].split(":")  # the user's values win, the others are added
    assert tunables[:2] == ["glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=4"]
    assert sorted(tunables[2:]) == ["glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 30}"]
    assert host_malloc.malloc_env({host_malloc.OPT_OUT_ENV: "0"}) is None


def _script(tmp_path, body):
    path = tmp_path / "tool.py"
    path.write_text(textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        from mesh_transformer.cli_util import run_main
        def main(argv):
            print("pid", os.getpid(), "tunables", os.environ.get("GLIBC_TUNABLES"), "argv", sys.argv[1:])
        {body}
    """))
    return path


def _bare_environ() -> dict:
    """This process's environment without the tunables or the opt-out (the subprocess decides for itself)."""
    return {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc.OPT_OUT_ENV)}


def _run(path, *args, **env):
    return subprocess.run([sys.executable, "-u", str(path), *args], env={**_bare_environ(), **env}, capture_output=True,
                          text=True, timeout=60, check=True).stdout.split()


@needs_tunables
def test_a_script_reexecs_itself_with_its_argv(tmp_path):
    out = _run(_script(tmp_path, "if __name__ == '__main__': sys.exit(run_main(main))"), "--flag", "a b")
    assert out[3] == ALL and out[5:] == ["['--flag',", "'a", "b']"]
    out = _run(_script(tmp_path, "if __name__ == '__main__': sys.exit(run_main(main))"), **{
        host_malloc.OPT_OUT_ENV: "0"})
    assert out[3] == "None"  # opted out


@needs_tunables
def test_the_tunables_keep_a_freed_big_block_mapped(tmp_path):
    """What the tunables are for: a 256 MiB block freed on one thread and allocated again on another (XLA:CPU's
    per-run temp buffer) is not faulted in again. Without them glibc maps it afresh: one fault per 4 KiB page."""
    path = tmp_path / "churn.py"
    path.write_text(textwrap.dedent("""
        import ctypes, resource, threading
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        faults = []
        def step():
            p = libc.malloc(256 << 20)
            ctypes.memset(p, 1, 256 << 20)  # touch every page
            libc.free(p)
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = threading.Thread(target=step); t.start(); t.join()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        print(max(faults[1:]))  # the steps after the first
    """))

    def faults(tunables):
        env = {**_bare_environ(), **({"GLIBC_TUNABLES": tunables} if tunables else {})}
        return int(subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=60,
                                  check=True).stdout)

    assert faults(None) >= 128  # 65,536 pages of 4 KiB; 128 of 2 MiB where huge pages are `always`
    assert faults(ALL) < 32


def test_run_main_with_an_argv_never_reexecs(tmp_path):
    out = _run(_script(tmp_path, "if __name__ == '__main__': sys.exit(run_main(main, ['x']))"))
    assert out[3] == "None"
