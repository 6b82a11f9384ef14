"""fastmesh._core.accesslog.AccessLog: the line format, '-' for what is missing, flushing."""
import re

from fastmesh._core.accesslog import AccessLog


class Ep:
    host, port = "10.0.0.5", 8080


def test_line_format_and_flush(tmp_path):
    path = tmp_path / "a.log"
    al = AccessLog(str(path))
    al.py_add(3412, b"127.0.0.1", b"GET /x HTTP/1.1", 200, None, "web", Ep(), b"rid-1")
    al.py_add(0, b"::1", None, 0, b"downstream_reset")
    assert path.read_text() == ""                       # pending until flushed
    al.flush()
    lines = path.read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(stamp + r' 127\.0\.0\.1 "GET /x HTTP/1\.1" 200 - 3\.412 web '
                        r'10\.0\.0\.5:8080 rid-1', lines[0]), lines[0]
    assert re.fullmatch(stamp + r' ::1 "-" - downstream_reset 0\.000 - - -', lines[1]), lines[1]
    al.close()
    al.flush()                                          # closed: nothing happens
    assert len(path.read_text().splitlines()) == 2


def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "a.log"
    path.write_text("old line\n")
    al = AccessLog(str(path))
    al.py_add(1, b"1.2.3.4", b"GET / HTTP/1.0", 404, b"no_route")
    al.close()
    text = path.read_text().splitlines()
    assert text[0] == "old line" and '"GET / HTTP/1.0" 404 no_route 0.001' in text[1]
