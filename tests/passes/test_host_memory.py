"""Available host memory for the offload budgets: MemAvailable, bounded by a container's cgroup
headroom (v2 and v1 layouts, with reclaimable page cache not counted as used)."""
from fxfuse.runtime import host_memory as hm


def test_meminfo_fields(tmp_path):
    f = tmp_path / "meminfo"
    f.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    assert hm.meminfo_bytes("MemAvailable", str(f)) == 8000000 * 1024
    assert hm.meminfo_bytes("MemTotal", str(f)) == 16000000 * 1024
    assert hm.meminfo_bytes("Nope", str(f)) is None
    assert hm.meminfo_bytes("MemAvailable", str(tmp_path / "missing")) is None


def test_cgroup_v2_headroom(tmp_path):
    (tmp_path / "memory.max").write_text("1000\n")
    (tmp_path / "memory.current").write_text("700\n")
    (tmp_path / "memory.stat").write_text("anon 500\nfile 200\ninactive_file 150\n")
    assert hm.cgroup_headroom(str(tmp_path)) == 1000 - (700 - 150)
    (tmp_path / "memory.max").write_text("max\n")  # no limit
    assert hm.cgroup_headroom(str(tmp_path)) is None


def test_cgroup_v1_headroom(tmp_path):
    v1 = tmp_path / "memory"
    v1.mkdir()
    (v1 / "memory.limit_in_bytes").write_text("2000\n")
    (v1 / "memory.usage_in_bytes").write_text("900\n")
    (v1 / "memory.stat").write_text("total_inactive_file 100\n")
    assert hm.cgroup_headroom(str(tmp_path)) == 2000 - 800
    (v1 / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "unlimited"
    assert hm.cgroup_headroom(str(tmp_path)) is None
    assert hm.cgroup_headroom(str(tmp_path / "nothing")) is None


def test_available_is_the_smaller(monkeypatch):
    monkeypatch.setattr(hm, "meminfo_bytes", lambda field, path="/proc/meminfo": 10 << 30)
    monkeypatch.setattr(hm, "cgroup_headroom", lambda root="/sys/fs/cgroup": 3 << 30)
    assert hm.available_bytes() == 3 << 30
    monkeypatch.setattr(hm, "cgroup_headroom", lambda root="/sys/fs/cgroup": None)
    assert hm.available_bytes() == 10 << 30
    monkeypatch.setattr(hm, "meminfo_bytes", lambda field, path="/proc/meminfo": None)
    assert hm.available_bytes() is None
