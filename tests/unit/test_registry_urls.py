"""Provider URLs as sofa-rpc-node 2.10 publishes them, and its subscriber's filter
(fastmesh.registry.urls); the config blocks that use them."""
import pytest
from hypothesis import given, settings, strategies as st

from fastmesh.config.load import ConfigError, load_dict, to_dict
from fastmesh.registry import urls

# a child node exactly as sofa-rpc-node's registry names it (urlencode.encode of the URL)
NODE_URL = ("bolt://10.0.0.5:12200?startTime=1700000000000&pid=42&uniqueId=&dynamic=true"
            "&appName=demo&timeout=3000&serialization=hessian2&weight=100&accepts=100000"
            "&language=nodejs&rpcVer=50400&protocol=&interface=com.example.EchoService"
            "&version=1.0&group=SOFA")
NODE_CHILD = ("bolt%3A%2F%2F10.0.0.5%3A12200%3FstartTime%3D1700000000000%26pid%3D42%26uniqueId"
              "%3D%26dynamic%3Dtrue%26appName%3Ddemo%26timeout%3D3000%26serialization%3Dhessian2"
              "%26weight%3D100%26accepts%3D100000%26language%3Dnodejs%26rpcVer%3D50400"
              "%26protocol%3D%26interface%3Dcom.example.EchoService%26version%3D1.0%26group%3DSOFA")
SPEC = urls.ServiceSpec.parse("com.example.EchoService:1.0")


def url(**params):
    base = {"interface": "com.example.EchoService", "version": "1.0", "group": "SOFA",
            "weight": "100"}
    base.update(params)
    q = "&".join(f"{k}={v}" for k, v in base.items() if v is not None)
    return urls.encode_child(f"bolt://127.0.0.1:{params.pop('port', 12200)}?{q}")


def test_sofa_rpc_node_child_decodes():
    assert urls.encode_child(NODE_URL) == NODE_CHILD
    assert urls.decode_child(NODE_CHILD) == NODE_URL
    p = urls.parse_provider(urls.decode_child(NODE_CHILD))
    assert (p.scheme, p.host, p.port, p.address) == ("bolt", "10.0.0.5", 12200, "10.0.0.5:12200")
    assert p.weight() == 100
    assert p.attributes()["serialization"] == "hessian2"
    assert "weight" not in p.attributes() and "interface" not in p.attributes()
    assert urls.matches(p, SPEC)


@pytest.mark.parametrize("params, ok", [
    ({}, True),
    ({"version": "2.0"}, False),                 # another version under the same interface
    ({"version": None}, True),                   # no version: any (as sofa-rpc-node)
    ({"group": "OTHER"}, False),
    ({"group": None, "default.group": "OTHER"}, False),
    ({"interface": "com.example.Other"}, False),
    ({"category": "providers"}, True),
    ({"category": "consumers"}, False),
    ({"enabled": "true"}, True),
    ({"enabled": "false"}, False),
    ({"protocol": "h2c"}, False),                # a Bolt listener cannot forward there
])
def test_filter_as_the_subscriber(params, ok):
    sel = urls.select([url(**params)], SPEC)
    assert len(sel.providers) == (1 if ok else 0)
    assert sel.skipped == (0 if ok else 1)


def test_select_weights_duplicates_and_junk():
    children = [url(weight="300"), url(weight="100", pid="2"), url(port=12201, weight="0"),
                url(port=12202, weight="x"), "not-a-url", "%E0%A4%A", urls.encode_child("bolt://")]
    sel = urls.select(children, SPEC)
    # one endpoint per address, the larger weight; weight 0: not routed to; bad weight: 100
    assert [p.address for p in sel.providers] == ["127.0.0.1:12200", "127.0.0.1:12202"]
    assert sel.weights == (300, 100)
    assert sel.skipped == 4
    assert sel.endpoints() == {"endpoints": ["127.0.0.1:12200", "127.0.0.1:12202"],
                               "weights": [300, 100]}


def test_missing_port_and_ipv6():
    p = urls.parse_provider("bolt://10.1.1.1?interface=x")
    assert p.port == urls.DEFAULT_PORT
    p = urls.parse_provider("bolt://[::1]:12200?interface=x")
    assert p.address == "[::1]:12200"
    assert urls.parse_provider("bolt://10.1.1.1:99999?x=1") is None
    assert urls.parse_provider("bolt://bad host:1?x") is None


def test_warmup_weight():
    u = urls.decode_child(url(startTime="1000", warmupTime="5000", warmupWeight="10"))
    p = urls.parse_provider(u)
    assert p.weight(now_ms=2000) == 10
    assert p.weight(now_ms=7000) == 100
    sel = urls.select([url(startTime="1000", warmupTime="5000", warmupWeight="10")], SPEC,
                      now_ms=2000)
    assert sel.weights == (10,) and sel.next_change_ms == 6000


def test_service_spec():
    s = urls.ServiceSpec.parse("a.B:1.0:uid", group="G")
    assert (s.interface, s.version, s.unique_id, s.group) == ("a.B", "1.0", "uid", "G")
    assert not urls.select([url(uniqueId="other")], s).providers
    with pytest.raises(ValueError):
        urls.ServiceSpec.parse("noversion")


def test_published_url_is_found_by_the_subscriber_filter():
    u = urls.provider_url("10.0.0.9", 12220, "com.example.EchoService", "1.0", "SOFA",
                          weight=7, app_name="me")
    sel = urls.select([urls.encode_child(u)], SPEC)
    assert [p.address for p in sel.providers] == ["10.0.0.9:12220"] and sel.weights == (7,)
    assert urls.parse_provider(u).params["appName"] == "me"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=8))
def test_any_children_never_raise(children):
    sel = urls.select(children, SPEC)
    assert len(sel.providers) + sel.skipped <= len(children)
    assert all(w > 0 for w in sel.weights)


@settings(max_examples=200, deadline=None)
@given(host=st.sampled_from(["10.0.0.1", "127.0.0.1", "::1", "svc.example"]),
       port=st.integers(1, 65535), weight=st.integers(1, 2**31 - 1),
       app=st.text(max_size=20), version=st.from_regex(r"[0-9][0-9.]{0,6}", fullmatch=True))
def test_publish_then_subscribe_round_trip(host, port, weight, app, version):
    u = urls.provider_url(host, port, "com.x.S", version, "SOFA", weight=weight, app_name=app)
    child = urls.encode_child(u)
    assert "/" not in child                       # one znode name
    assert urls.decode_child(child) == u
    sel = urls.select([child], urls.ServiceSpec.parse(f"com.x.S:{version}"))
    (p,) = sel.providers
    assert (p.host, p.port, sel.weights) == (host, port, (weight,))
    assert p.params["appName"] == app


# ---------------------------------------------------------------------------- config

def _cfg(discovery=None, publish=None, listen="127.0.0.1:0"):
    lst = {"name": "rpc", "protocol": "bolt", "address": listen, "route_table": "rpc"}
    if publish is not None:
        lst["publish"] = publish
    cl = {"name": "echo"}
    if discovery is not None:
        cl["discovery"] = discovery
    else:
        cl["endpoints"] = ["127.0.0.1:1"]
    return {"listeners": [lst], "route_tables": {"rpc": {"routes": [
        {"match": {"headers": [{"name": "service", "exact": "a.B:1.0"}]}, "cluster": "echo"}]}},
        "clusters": [cl]}


def test_config_round_trip():
    cfg = load_dict(_cfg(discovery={"zookeeper": {"servers": "127.0.0.1:2181,h2:2182",
                                                  "service": "a.B:1.0", "group": "G"}},
                         publish={"zookeeper": {"servers": "127.0.0.1:2181",
                                                "services": ["a.B:1.0", "c.D:2"]}}))
    z = cfg.clusters["echo"].discovery.zookeeper
    assert (z.servers, z.group, z.root, z.session_timeout_ms) == \
        ("127.0.0.1:2181,h2:2182", "G", "/sofa-rpc", 5000)
    assert cfg.clusters["echo"].endpoints == ()
    assert cfg.listeners[0].publish.zookeeper.services == ("a.B:1.0", "c.D:2")
    assert load_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("discovery, publish, listen, error", [
    ({"zookeeper": {"servers": "127.0.0.1:2181"}}, None, "127.0.0.1:0",
     "clusters[0].discovery.zookeeper.service: missing required key"),
    ({"zookeeper": {"servers": "127.0.0.1", "service": "a.B:1.0"}}, None, "127.0.0.1:0",
     "clusters[0].discovery.zookeeper.servers"),
    ({"zookeeper": {"servers": "h:1", "service": "a.B"}}, None, "127.0.0.1:0",
     'expected a SOFARPC service id "interface:version"'),
    ({"zookeeper": {"servers": "h:1", "service": "a.B:1", "root": "sofa"}}, None, "127.0.0.1:0",
     "clusters[0].discovery.zookeeper.root"),
    ({"consul": {}}, None, "127.0.0.1:0", "clusters[0].discovery.consul: unknown key"),
    (None, {"zookeeper": {"servers": "h:1", "services": ["a.B:1"]}}, "0.0.0.0:0",
     "listeners[0].publish.zookeeper.advertise_host: required"),
    (None, {"zookeeper": {"servers": "h:1", "services": []}}, "127.0.0.1:0",
     "listeners[0].publish.zookeeper.services: expected a non-empty list"),
    (None, {"zookeeper": {"servers": "h:1", "services": ["a.B:1"], "weight": 0}},
     "127.0.0.1:0", "listeners[0].publish.zookeeper.weight"),
])
def test_config_errors(discovery, publish, listen, error):
    with pytest.raises(ConfigError) as ei:
        load_dict(_cfg(discovery, publish, listen))
    assert any(error in e for e in ei.value.errors), ei.value.errors
