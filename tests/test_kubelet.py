"""The stand-in kubelet's own logic, without a cluster: what the end-to-end tests
(tests/test_cluster_e2e.py) rely on but cannot provoke at will."""

from __future__ import annotations

import argparse

import kubelet
from kubelet import ApiError, expand


class FakeApi:
    """Two lists and two watches: the first watch ends with 410 Gone (resourceVersion too
    old), the second with a dropped connection."""

    host, port = "127.0.0.1", 6443

    def __init__(self, stop):
        self.stop, self.lists, self.watches = stop, 0, []

    def request(self, method, path, body=None, *, query=None, **_):
        assert (method, path) == ("GET", "/api/v1/pods")
        self.lists += 1
        return {"metadata": {"resourceVersion": str(100 * self.lists)},
                "items": [_pod(f"listed-{self.lists}")]}

    def watch(self, path, query, read_timeout):
        self.watches.append(query["resourceVersion"])
        if len(self.watches) == 1:
            yield {"type": "ADDED", "object": _pod("a", rv="101")}
            yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "150"}}}
            yield {"type": "ERROR", "object": {"kind": "Status", "code": 410,
                                               "message": "too old resource version"}}
        elif len(self.watches) == 2:
            yield {"type": "MODIFIED", "object": _pod("b", rv="201")}
            raise ConnectionResetError("the API server restarted")
        else:
            self.stop.set()
            raise ApiError(500, {"message": "stop"}, "watch")


def _pod(name, rv="1"):
    return {"metadata": {"name": name, "namespace": "ns", "uid": name, "resourceVersion": rv},
            "spec": {"containers": []}}


def test_the_pod_watch_relists_after_410_and_resumes_after_a_dropped_connection(tmp_path,
                                                                              monkeypatch):
    args = argparse.Namespace(node="n", state_dir=str(tmp_path), kubeconfig="unused", cpu="1",
                              memory="1Gi", gpus=0, pods=10, label=None, path_prepend=None,
                              expose=["/usr"])
    monkeypatch.setattr(kubelet, "Api", lambda *a: None)
    node = kubelet.Kubelet(args)
    node.api = FakeApi(node.stopping)
    node.stopping.wait = lambda timeout=None: node.stopping.is_set()  # no pauses
    node._watch_pods()
    events = []
    while not node.events.empty():
        kind, obj = node.events.get()
        events.append((kind, [p["metadata"]["name"] for p in obj] if kind == "LIST"
                       else obj["metadata"]["name"]))
    assert events == [("LIST", ["listed-1"]), ("ADDED", "a"), ("LIST", ["listed-2"]),
                      ("MODIFIED", "b")]
    # after 410: a new list and a watch from its resourceVersion; after a dropped connection:
    # the same watch again from the last event seen, no list
    assert node.api.watches == ["100", "200", "201"] and node.api.lists == 2


def test_the_kubelet_forgets_pods_missing_from_a_relist(tmp_path, monkeypatch):
    args = argparse.Namespace(node="n", state_dir=str(tmp_path), kubeconfig="unused", cpu="1",
                              memory="1Gi", gpus=0, pods=10, label=None, path_prepend=None,
                              expose=["/usr"])
    monkeypatch.setattr(kubelet, "Api", lambda *a: None)
    node = kubelet.Kubelet(args)
    node._apply("LIST", [_pod("a"), _pod("b")])
    node._apply("LIST", [_pod("b")])  # "a" was deleted while no watch ran
    assert node.runs["a"].gone and not node.runs["b"].gone


def test_variable_references_expand_as_kubernetes_expands_them():
    env = {"A": "1", "B": "x y"}
    assert expand("$(A)-$(B)", env) == "1-x y"
    assert expand("$(MISSING) and $$(A) and $A", env) == "$(MISSING) and $(A) and $A"
