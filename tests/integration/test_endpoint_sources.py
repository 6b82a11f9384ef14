"""Each endpoint's source in /clusters and /config_dump: file (an IP literal), dns (a
hostname); registry and xds are covered by the registry and xDS tests."""
import json

from fmtest import simple_config


def test_file_and_dns_sources(start_upstream, start_fastmesh):
    up = start_upstream("a")
    cfg = simple_config({"web": [up.address], "named": [f"localhost:{up.port}"]})
    fm = start_fastmesh(cfg)
    status, body = fm.admin("/clusters")
    assert status == 200
    clusters = json.loads(body)
    assert [e["source"] for e in clusters["web"]] == ["file"]
    assert {e["source"] for e in clusters["named"]} == {"dns"}
    status, body = fm.admin("/config_dump")
    dump = json.loads(body)["endpoint_sources"]
    assert dump["web"] == {"source": "file", "endpoints": [
        {"address": up.address, "source": "file", "weight": 1}]}
    assert dump["named"]["endpoints"][0]["source"] == "dns"
