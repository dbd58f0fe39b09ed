"""CPU per model call: the openai client as the worker uses it, against lighter clients.

    python bench/model_client.py [--calls 500]

Starts the fake model in a process of its own (so its CPU is not counted), then makes
the same chat-completion request, one call at a time, through: ``ask_model`` itself
(the openai client's ``post()``, its answer read as a stream under the call's deadline
and size limit); the client's ``chat.completions.create()``; its ``post()`` with the
answer read as bytes; the httpx2 client under it; requests; and http.client.  Prints
the CPU time of this process per call, and each against ``ask_model``.
"""
import argparse
import json
import multiprocessing
import os
import time
import urllib.parse

import common  # noqa: F401 - puts tests/ on the path

BODY = {'model': 'gpt-3.5-turbo', 'temperature': 0.2, 'messages': [
    {'role': 'system', 'content': 'You tag short personal notes. ' * 12},
    {'role': 'user', 'content': 'Note about reading, work and travel'}]}


def serve(ready) -> None:
    from fake_model import FakeModel
    with FakeModel(api_key='sk-bench-model-key') as fake:
        ready.put(fake.url)
        time.sleep(3600)


def cpu_per_call(call, calls: int) -> float:
    for _ in range(50):
        call()
    started = time.process_time()
    for _ in range(calls):
        call()
    return (time.process_time() - started) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--calls', type=int, default=500)
    args = parser.parse_args()
    print(common.machine())
    ready = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(ready,), daemon=True)
    server.start()
    url = ready.get(timeout=30)
    try:
        import http.client

        import openai
        import requests

        os.environ.setdefault('WHITENOTE_SECRET', common.SECRET)
        import whitenote_huey
        endpoint = whitenote_huey.ModelSettings(url, 'sk-bench-model-key', BODY['model'])
        client = openai.OpenAI(base_url=url + '/v1', api_key='sk-bench-model-key', max_retries=0,
                               timeout=20, http_client=openai.DefaultHttpxClient(follow_redirects=False))
        httpx_client = openai.DefaultHttpxClient(follow_redirects=False)
        session = requests.Session()
        headers = {'Authorization': 'Bearer sk-bench-model-key'}
        parts = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)

        def plain() -> dict:
            connection.request('POST', '/v1/chat/completions', body=json.dumps(BODY).encode(),
                               headers=dict(headers, **{'Content-Type': 'application/json'}))
            return json.loads(connection.getresponse().read())

        cases = {
            'ask_model()': lambda: whitenote_huey.ask_model(endpoint, BODY['messages'], BODY['temperature']),
            'openai chat.completions.create()': lambda: client.chat.completions.create(**BODY),
            'openai post(), bytes': lambda: json.loads(
                client.post('/chat/completions', body=BODY, cast_to=bytes)),
            'httpx2 client post()': lambda: httpx_client.post(
                url + '/v1/chat/completions', json=BODY, headers=headers).json(),
            'requests Session.post()': lambda: session.post(
                url + '/v1/chat/completions', json=BODY, headers=headers, timeout=20).json(),
            'http.client': plain,
        }
        results = {name: cpu_per_call(call, args.calls) for name, call in cases.items()}
    finally:
        server.terminate()
    base = results['ask_model()']
    print('%d calls each, one at a time, CPU of this process per call (the server runs apart)' % args.calls)
    for name, seconds in results.items():
        print('%-40s %6.2f ms  %5.2fx' % (name, 1000 * seconds, seconds / base))


if __name__ == '__main__':
    main()
