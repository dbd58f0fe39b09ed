"""Tests of the RAGFlow test double itself, over real HTTP, so the worker's tests can trust it."""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fake_ragflow import FakeRagflow

KEY, OTHER_KEY = "ragflow-key-alice", "ragflow-key-bob"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def fake() -> Iterator[FakeRagflow]:
    with FakeRagflow() as server:
        yield server


@pytest.fixture
def ds(fake: FakeRagflow) -> str:
    return fake.add_dataset(KEY, name="alice notes")


def docs_url(fake: FakeRagflow, dataset_id: str) -> str:
    return f"{fake.url}/api/v1/datasets/{dataset_id}/documents"


def upload(fake: FakeRagflow, dataset_id: str, *files: tuple[str, bytes], **kwargs) -> requests.Response:
    return requests.post(docs_url(fake, dataset_id), headers=AUTH,
                         files=[("file", f) for f in files], timeout=5, **kwargs)


def listing(fake: FakeRagflow, dataset_id: str, **params) -> dict:
    return requests.get(docs_url(fake, dataset_id), headers=AUTH, params=params, timeout=5).json()


def test_upload_list_download_delete_roundtrip(fake: FakeRagflow, ds: str) -> None:
    body = upload(fake, ds, ("note.md", "# Titre\nhéllo".encode())).json()
    assert body["code"] == 0 and set(body) == {"code", "data"}
    doc = body["data"][0]
    assert re.fullmatch(r"[0-9a-f]{32}", doc["id"])
    assert (doc["name"], doc["dataset_id"], doc["run"], doc["type"]) == ("note.md", ds, "UNSTART", "doc")
    assert doc["size"] == len("# Titre\nhéllo".encode()) and doc["chunk_method"] == "naive"
    assert doc["location"] == "note.md"

    listed = listing(fake, ds)
    assert listed["code"] == 0 and listed["data"]["total"] == 1
    assert listed["data"]["docs"][0]["id"] == doc["id"]
    assert listed["data"]["docs"][0]["chunk_count"] == 0

    got = requests.get(f"{docs_url(fake, ds)}/{doc['id']}", headers=AUTH, timeout=5)
    assert got.status_code == 200 and got.content == "# Titre\nhéllo".encode()
    assert got.headers["Content-Type"] == "application/octet-stream"
    assert fake.documents(ds)[0]["content"] == "# Titre\nhéllo"

    deleted = requests.delete(docs_url(fake, ds), headers=AUTH, json={"ids": [doc["id"]]}, timeout=5)
    assert deleted.json() == {"code": 0}
    assert fake.documents(ds) == [] and fake.errors == []


def test_upload_several_files_in_one_request(fake: FakeRagflow, ds: str) -> None:
    data = upload(fake, ds, ("a.md", b"a"), ("été 1.txt", b"b")).json()["data"]
    assert [d["name"] for d in data] == ["a.md", "été 1.txt"]
    assert fake.requests[-1].files == [("a.md", b"a"), ("été 1.txt", b"b")]
    got = requests.get(f"{docs_url(fake, ds)}/{data[1]['id']}", headers=AUTH, timeout=5)
    assert got.content == b"b" and "%C3%A9t%C3%A9" in got.headers["Content-Disposition"]


def test_duplicate_names_are_renamed_like_ragflow(fake: FakeRagflow, ds: str) -> None:
    names = [upload(fake, ds, ("n.md", b"x")).json()["data"][0]["name"] for _ in range(3)]
    assert names == ["n.md", "n(1).md", "n(2).md"]
    assert upload(fake, ds, ("n(1).md", b"y")).json()["data"][0]["name"] == "n(3).md"
    assert {d["name"] for d in fake.documents(ds)} == {"n.md", "n(1).md", "n(2).md", "n(3).md"}


def test_concurrent_duplicate_uploads_get_unique_names(fake: FakeRagflow, ds: str) -> None:
    with ThreadPoolExecutor(16) as pool:
        names = list(pool.map(lambda i: upload(fake, ds, ("same.md", b"%d" % i)).json()["data"][0]["name"],
                              range(32)))
    assert sorted(names) == sorted(["same.md"] + [f"same({i}).md" for i in range(1, 32)])


def test_upload_errors(fake: FakeRagflow, ds: str) -> None:
    no_part = requests.post(docs_url(fake, ds), headers=AUTH, json={"file": "x"}, timeout=5)
    assert no_part.status_code == 200 and no_part.json() == {"code": 101, "message": "No file part!"}
    empty_name = upload(fake, ds, ("", b"x")).json()
    assert empty_name == {"code": 101, "message": "No file selected!"}
    long_name = upload(fake, ds, ("x" * 256 + ".md", b"x")).json()
    assert long_name == {"code": 101, "message": "File name must be 255 bytes or less."}
    unsupported = upload(fake, ds, ("a.xyz", b"x")).json()
    assert unsupported == {"code": 500, "message": "a.xyz: This type of file has not been supported yet!"}
    assert fake.documents(ds) == []


def test_auth_errors(fake: FakeRagflow, ds: str) -> None:
    url = docs_url(fake, ds)
    assert requests.get(url, timeout=5).json() == {
        "code": 0, "message": "`Authorization` can't be empty", "data": False}
    assert requests.get(url, headers={"Authorization": KEY}, timeout=5).json() == {
        "code": 0, "message": "Please check your authorization format.", "data": False}
    bad = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert bad.status_code == 200
    assert bad.json() == {"code": 109, "message": "Authentication error: API key is invalid!", "data": False}


def test_foreign_and_unknown_datasets_are_rejected(fake: FakeRagflow, ds: str) -> None:
    other = fake.add_dataset(OTHER_KEY)
    doc_id = fake.add_document(other, "bob.md", "secret")["id"]
    url = docs_url(fake, other)
    assert listing(fake, other) == {"code": 102, "message": f"You don't own the dataset {other}. "}
    assert requests.delete(url, headers=AUTH, json={"ids": [doc_id]}, timeout=5).json() == {
        "code": 102, "message": f"You don't own the dataset {other}. "}
    parse = requests.post(f"{fake.url}/api/v1/datasets/{other}/chunks", headers=AUTH,
                          json={"document_ids": [doc_id]}, timeout=5)
    assert parse.json() == {"code": 102, "message": f"You don't own the dataset {other}."}
    assert requests.get(f"{url}/{doc_id}", headers=AUTH, timeout=5).json() == {
        "code": 102, "message": f"You do not own the dataset {other}."}
    assert upload(fake, other, ("x.md", b"x")).json() == {"code": 109, "message": "No authorization."}
    assert upload(fake, "f" * 32, ("x.md", b"x")).json() == {
        "code": 102, "message": f"Can't find the dataset with ID {'f' * 32}!"}
    assert [d["name"] for d in fake.documents(other)] == ["bob.md"]


def test_list_filters(fake: FakeRagflow, ds: str) -> None:
    for name in ("alpha.md", "Beta.md", "alphabet.txt"):
        fake.add_document(ds, name, name)
    assert listing(fake, ds, name="missing.md") == {"code": 102, "message": "You don't own the document missing.md."}
    assert listing(fake, ds, id="0" * 32) == {"code": 102, "message": f"You don't own the document {'0' * 32}."}
    assert [d["name"] for d in listing(fake, ds, name="Beta.md")["data"]["docs"]] == ["Beta.md"]
    by_keyword = listing(fake, ds, keywords="ALPHA", desc="false")["data"]
    assert by_keyword["total"] == 2 and [d["name"] for d in by_keyword["docs"]] == ["alpha.md", "alphabet.txt"]
    assert [d["name"] for d in listing(fake, ds, suffix="txt")["data"]["docs"]] == ["alphabet.txt"]
    assert listing(fake, ds, orderby="nope")["code"] == 100
    assert listing(fake, ds, page="x")["code"] == 100


def test_paging_and_order(fake: FakeRagflow, ds: str) -> None:
    for i in range(5):
        fake.add_document(ds, f"{i}.md", str(i))
    newest_first = [d["name"] for d in listing(fake, ds)["data"]["docs"]]
    assert newest_first == ["4.md", "3.md", "2.md", "1.md", "0.md"]
    pages = [listing(fake, ds, page=p, page_size=2, desc="false")["data"] for p in (1, 2, 3, 4)]
    assert [[d["name"] for d in page["docs"]] for page in pages] == [["0.md", "1.md"], ["2.md", "3.md"], ["4.md"], []]
    assert {page["total"] for page in pages} == {5}


def test_delete_errors_and_delete_all(fake: FakeRagflow, ds: str) -> None:
    kept = fake.add_document(ds, "a.md", "a")["id"]
    gone = fake.add_document(ds, "b.md", "b")["id"]
    unknown = requests.delete(docs_url(fake, ds), headers=AUTH, json={"ids": [gone, "nope"]}, timeout=5)
    assert unknown.json() == {"code": 102, "message": "Documents not found: ['nope']"}
    assert [d["id"] for d in fake.documents(ds)] == [kept]

    fake.delete_all_on_empty_ids = False
    assert requests.delete(docs_url(fake, ds), headers=AUTH, json={"ids": []}, timeout=5).json() == {"code": 0}
    assert len(fake.documents(ds)) == 1
    fake.delete_all_on_empty_ids = True
    assert requests.delete(docs_url(fake, ds), headers=AUTH, json={"ids": []}, timeout=5).json() == {"code": 0}
    assert fake.documents(ds) == []


def test_parse_marks_running_then_done(fake: FakeRagflow, ds: str) -> None:
    doc_id = fake.add_document(ds, "a.md", "one two three")["id"]
    chunks = f"{fake.url}/api/v1/datasets/{ds}/chunks"
    assert requests.post(chunks, headers=AUTH, json={}, timeout=5).json() == {
        "code": 102, "message": "`document_ids` is required"}
    assert requests.post(chunks, headers=AUTH, json={"document_ids": ["nope"]}, timeout=5).json() == {
        "code": 102, "message": "Documents not found: ['nope']"}

    fake.parse_seconds = 0.2
    assert requests.post(chunks, headers=AUTH, json={"document_ids": [doc_id]}, timeout=5).json() == {"code": 0}
    assert fake.documents(ds)[0]["run"] == "RUNNING"
    time.sleep(0.05)
    busy = requests.post(chunks, headers=AUTH, json={"document_ids": [doc_id]}, timeout=5).json()
    assert busy == {"code": 102, "message": "Can't parse document that is currently being processed"}
    time.sleep(0.2)
    done = listing(fake, ds)["data"]["docs"][0]
    assert (done["run"], done["progress"], done["token_count"]) == ("DONE", 1.0, 3)


def test_download_errors(fake: FakeRagflow, ds: str) -> None:
    empty = fake.add_document(ds, "empty.md", b"")["id"]
    url = docs_url(fake, ds)
    assert requests.get(f"{url}/{empty}", headers=AUTH, timeout=5).json() == {
        "code": 102, "message": "This file is empty."}
    assert requests.get(f"{url}/nope", headers=AUTH, timeout=5).json() == {
        "code": 102, "message": "The dataset not own the document nope."}


def test_requests_are_recorded_and_counted(fake: FakeRagflow, ds: str) -> None:
    before = time.monotonic()
    upload(fake, ds, ("a.md", b"hello"), params={"x": "1"})
    listing(fake, ds, page=2)
    first = fake.requests[0]
    assert first.time >= before and first.method == "POST" and first.dataset_id == ds
    assert first.path == f"/api/v1/datasets/{ds}/documents" and first.query == {"x": "1"}
    assert first.headers["Authorization"] == f"Bearer {KEY}" and first.files == [("a.md", b"hello")]
    assert first.json is None and b"hello" in first.body
    assert fake.requests[1].query == {"page": "2"}
    assert fake.count("POST", "/documents") == 1 and fake.count("get") == 1 and fake.count(None) == 2
    fake.reset_requests()
    assert fake.requests == [] and fake.count("GET") == 0


def test_keep_alive_reuses_the_connection(fake: FakeRagflow, ds: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    sockets = []
    for _ in range(3):
        conn.request("GET", f"/api/v1/datasets/{ds}/documents", headers=AUTH)
        response = conn.getresponse()
        assert response.status == 200 and b'"code": 0' in response.read()
        sockets.append(conn.sock)
    conn.close()
    assert sockets[0] is not None and all(s is sockets[0] for s in sockets)


def test_stop_cuts_kept_alive_connections(ds: str, fake: FakeRagflow) -> None:
    session = requests.Session()
    assert session.get(docs_url(fake, ds), headers=AUTH, timeout=5).json()["code"] == 0
    fake.stop()
    with pytest.raises(requests.ConnectionError):
        session.get(docs_url(fake, ds), headers=AUTH, timeout=5)


@pytest.mark.parametrize(("kind", "status"), [("http500", 500), ("http502", 502)])
def test_fault_http_5xx(fake: FakeRagflow, ds: str, kind: str, status: int) -> None:
    fake.fail_next(kind)
    failed = requests.get(docs_url(fake, ds), headers=AUTH, timeout=5)
    assert failed.status_code == status and failed.text
    assert listing(fake, ds)["code"] == 0


def test_fault_http401(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("http401")
    failed = requests.get(docs_url(fake, ds), headers=AUTH, timeout=5)
    assert failed.status_code == 401
    assert failed.json() == {"code": 401, "message": "<Unauthorized '401: Unauthorized'>", "data": None}


def test_fault_json_envelopes(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("auth")
    assert listing(fake, ds) == {"code": 109, "message": "Authentication error: API key is invalid!", "data": False}
    fake.fail_next("busy")
    busy = listing(fake, ds)
    assert busy["code"] == 100 and "busy" in busy["message"].lower()
    fake.fail_next("data_false")
    false = listing(fake, ds)
    assert false["code"] == 0 and false["data"] is False
    fake.fail_next("busy", code=102, message="server busy")
    assert listing(fake, ds) == {"code": 102, "message": "server busy", "data": None}


def test_fault_malformed(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("malformed")
    response = requests.get(docs_url(fake, ds), headers=AUTH, timeout=5)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()


def test_fault_slow_and_delay(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("slow", seconds=0.3)
    start = time.monotonic()
    assert listing(fake, ds)["code"] == 0
    assert time.monotonic() - start >= 0.3
    fake.delay = 0.2
    start = time.monotonic()
    assert listing(fake, ds)["code"] == 0
    assert time.monotonic() - start >= 0.2


def test_fault_slow_times_out_client_but_still_stores(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("slow", seconds=0.4, method="POST")
    with pytest.raises(requests.Timeout):
        requests.post(docs_url(fake, ds), headers=AUTH, files=[("file", ("late.md", b"x"))], timeout=0.1)
    time.sleep(0.5)
    assert [d["name"] for d in fake.documents(ds)] == ["late.md"]


def test_fault_drop_after_store(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("drop_after_store", method="POST", path_contains="/documents")
    with pytest.raises(requests.ConnectionError):
        upload(fake, ds, ("a.md", b"stored anyway"))
    assert [d["content"] for d in fake.documents(ds)] == ["stored anyway"]
    assert upload(fake, ds, ("a.md", b"retry")).json()["data"][0]["name"] == "a(1).md"


def test_fault_drop(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("drop")
    with pytest.raises(requests.ConnectionError):
        upload(fake, ds, ("a.md", b"lost"))
    assert fake.documents(ds) == [] and fake.count("POST") == 1


def test_fault_retry_after(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("retry_after", seconds=2)
    limited = requests.get(docs_url(fake, ds), headers=AUTH, timeout=5)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "2"
    fake.fail_next("retry_after", seconds=1, status=503)
    unavailable = requests.get(docs_url(fake, ds), headers=AUTH, timeout=5)
    assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "1"


def test_fault_matching_and_times(fake: FakeRagflow, ds: str) -> None:
    fake.fail_next("http500", times=2, method="POST", path_contains="/chunks")
    assert listing(fake, ds)["code"] == 0
    assert upload(fake, ds, ("a.md", b"a")).status_code == 200
    chunks = f"{fake.url}/api/v1/datasets/{ds}/chunks"
    statuses = [requests.post(chunks, headers=AUTH, json={"document_ids": ["x"]}, timeout=5).status_code
                for _ in range(3)]
    assert statuses == [500, 500, 200]
    with pytest.raises(ValueError):
        fake.fail_next("explode")


def test_unknown_route_is_code_100(fake: FakeRagflow) -> None:
    response = requests.get(f"{fake.url}/api/v1/nothing", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"code": 100, "message": "<NotFound '404: Not Found'>", "data": None}
    assert [repr(e) for e in fake.errors] == ["<NotFound '404: Not Found'>"]


def test_rename_keeps_names_unique_and_extensions(fake: FakeRagflow, ds: str) -> None:
    first = fake.add_document(ds, "a.md", "a")["id"]
    fake.add_document(ds, "b.md", "b")
    url = f"{docs_url(fake, ds)}/{first}"
    assert requests.put(url, headers=AUTH, json={"name": "b.md"}, timeout=5).json() == {
        "code": 102, "message": "Duplicated document name in the same dataset."}
    assert requests.put(url, headers=AUTH, json={"name": "a.txt"}, timeout=5).json()["code"] == 101
    assert requests.put(url, headers=AUTH, json={"name": "c.md"}, timeout=5).json()["code"] == 0
    assert sorted(d["name"] for d in fake.documents(ds)) == ["b.md", "c.md"]
