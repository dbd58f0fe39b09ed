"""Keys the web app stores encrypted in AiConfig (openaiApiKey, ragflowApiKey).

Vectors are made by Node's crypto with the web app's algorithm (tests/webapp_crypto.cjs):
the committed ones in tests/webapp-keys.json, and fresh ones where node is there.
"""
import base64
import dataclasses
import json
import logging
import os
import secrets
import subprocess

import pytest
from fake_model import FakeModel
from fake_model import tags
from services import drain
from services import job_state
from services import make_message
from services import make_user
from services import require
from services import tag_names

import whitenote_huey
from whitenote_huey import PermanentError
from whitenote_huey import decrypt_key

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = json.load(open(os.path.join(HERE, 'webapp-keys.json')))


@pytest.fixture
def web_secret(monkeypatch):
    """Set the secret the worker decrypts with, as ENCRYPTION_KEY (or another setting) would."""
    def use(secret: str, setting: str = 'ENCRYPTION_KEY') -> None:
        monkeypatch.setattr(whitenote_huey, 'settings', dataclasses.replace(
            whitenote_huey.settings, encryption_secret=secret, encryption_setting=setting))
    return use


def node_encrypt(items: list[dict]) -> list[dict]:
    """Each {secret, plaintext} encrypted by Node's crypto, as the web app does."""
    from services import node_available
    require('node', node_available())
    result = subprocess.run(['node', os.path.join(HERE, 'webapp_crypto.cjs')], input=json.dumps(items),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_committed_vectors_from_node_decrypt(web_secret):
    for vector in VECTORS:
        web_secret(vector['secret'])
        assert decrypt_key(vector['ciphertext'], 'AiConfig.openaiApiKey') == vector['plaintext']


def test_fresh_vectors_from_node_decrypt(web_secret):
    items = [{'secret': secret, 'plaintext': plaintext}
             for secret in (secrets.token_urlsafe(32), 'short', 'ключ with spaces')
             for plaintext in ('sk-' + secrets.token_hex(24), 'k', '密钥🔑', 'x' * 500)]
    for item in node_encrypt(items):
        web_secret(item['secret'])
        assert decrypt_key(item['ciphertext'], 'AiConfig.ragflowApiKey') == item['plaintext']


def test_a_value_that_is_not_ciphertext_is_a_legacy_plain_key(web_secret):
    """Only strict, canonical base64 of at least 97 bytes is taken for ciphertext."""
    web_secret('whatever')
    ciphertext = VECTORS[0]['ciphertext']
    alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
    exact = base64.b64encode(bytes(97)).decode()  # ends "A==": 4 padding bits, all zero
    padding_bits_set = exact[:-3] + alphabet[alphabet.index(exact[-3]) | 1] + '=='
    plain = ['sk-proj-abc123DEF456ghi789', 'ragflow-IjZmNDZiNmI0',
             'sk-' + 'A' * 200,  # long, but "-" is not base64
             base64.b64encode(bytes(96)).decode(),  # strict base64 of 96 bytes: too short
             ciphertext[:-1],  # not a multiple of 4
             ciphertext[:50] + '-' + ciphertext[51:],  # base64url
             ciphertext[:100] + '\n' + ciphertext[100:],  # not one base64 run
             padding_bits_set]
    for value in plain:
        assert decrypt_key(value, 'AiConfig.openaiApiKey') == value.strip()
    assert decrypt_key('  sk-spaced  ', 'AiConfig.openaiApiKey') == 'sk-spaced'


def test_ciphertext_that_does_not_decrypt_names_encryption_key(web_secret):
    vector = VECTORS[0]
    web_secret('not the web app secret')
    with pytest.raises(PermanentError) as wrong:
        decrypt_key(vector['ciphertext'], 'AiConfig.openaiApiKey')
    web_secret('')
    with pytest.raises(PermanentError) as unset:
        decrypt_key(vector['ciphertext'], 'AiConfig.ragflowApiKey')
    web_secret('not the web app secret either', 'AUTH_SECRET')
    with pytest.raises(PermanentError) as fallback:
        decrypt_key(vector['ciphertext'], 'AiConfig.openaiApiKey')
    assert str(wrong.value) == ("AiConfig.openaiApiKey, stored encrypted by the web app, does not decrypt "
                                "with the key of ENCRYPTION_KEY: set ENCRYPTION_KEY to the web app's")
    assert str(unset.value) == ('AiConfig.ragflowApiKey, stored encrypted by the web app, cannot be read: '
                                'none of ENCRYPTION_KEY, AUTH_SECRET, NEXTAUTH_SECRET is set; set '
                                "ENCRYPTION_KEY to the web app's")
    for error in (wrong, unset):  # whole, once redacted as every recorded error is
        assert whitenote_huey.redact(str(error.value)) == str(error.value)
    assert '(taken from AUTH_SECRET: ENCRYPTION_KEY is unset)' in str(fallback.value)
    for error in (wrong, unset, fallback):
        text = str(error.value)
        assert vector['ciphertext'][:12] not in text and 'not the web app' not in text
        assert error.value.__cause__ is None  # no chained error that might hold the key
        assert error.value.__context__ is None or error.value.__suppress_context__


def test_the_secret_is_the_first_the_web_app_would_take():
    load = whitenote_huey.load_settings
    assert load({'ENCRYPTION_KEY': 'e', 'AUTH_SECRET': 'a', 'NEXTAUTH_SECRET': 'n'}).encryption_secret == 'e'
    assert load({'ENCRYPTION_KEY': '', 'AUTH_SECRET': 'a', 'NEXTAUTH_SECRET': 'n'}).encryption_setting == 'AUTH_SECRET'
    assert load({'NEXTAUTH_SECRET': 'n'}).encryption_secret == 'n'
    assert load({}).encryption_secret == ''
    assert 'e-secret' not in repr(load({'ENCRYPTION_KEY': 'e-secret'}))


def test_the_key_is_derived_once_per_process(web_secret):
    web_secret(VECTORS[0]['secret'])
    whitenote_huey.encryption_key.cache_clear()
    for _ in range(20):
        for vector in VECTORS[:2]:
            assert decrypt_key(vector['ciphertext'], 'AiConfig.openaiApiKey') == vector['plaintext']
    assert whitenote_huey.encryption_key.cache_info().misses == 1


@pytest.mark.usefixtures('redis_queue')
def test_jobs_send_the_decrypted_keys(db, web_secret, ragflow):
    model_key, ragflow_key = VECTORS[0], VECTORS[1]
    web_secret(model_key['secret'])
    dataset = ragflow.add_dataset(ragflow_key['plaintext'])
    with FakeModel(api_key=model_key['plaintext']) as model:  # refuses any other key
        model.respond(tags('decrypted'))
        user = make_user(config=dict(openai_base_url=model.url, openai_api_key=model_key['ciphertext'],
                                     ragflow_base_url=ragflow.url, ragflow_api_key=ragflow_key['ciphertext'],
                                     ragflow_dataset_id=dataset))
        note = make_message(user, 'a note for encrypted keys')
        whitenote_huey.auto_tag(user.id, note.id)
        drain(whitenote_huey.huey)
    assert tag_names(note.id) == ['decrypted']
    assert job_state('sync-ragflow', note.id).status == 'done'
    assert [doc['name'] for doc in ragflow.documents(dataset)] == ['message_%s.md' % note.id]


@pytest.mark.usefixtures('redis_queue')
def test_a_key_that_does_not_decrypt_fails_the_job_at_once_and_is_never_sent(db, web_secret, model, ragflow,
                                                                               caplog):
    vector = VECTORS[0]
    web_secret('the wrong secret')
    dataset = ragflow.add_dataset(VECTORS[1]['plaintext'])
    user = make_user(config=dict(openai_base_url=model.url, openai_api_key=vector['ciphertext'],
                                 ragflow_base_url=ragflow.url, ragflow_api_key=VECTORS[1]['ciphertext'],
                                 ragflow_dataset_id=dataset))
    note = make_message(user, 'never sent with ciphertext')
    with caplog.at_level(logging.INFO, logger='huey'):
        whitenote_huey.auto_tag(user.id, note.id)
        whitenote_huey.sync_ragflow(user.id, note.id)
        drain(whitenote_huey.huey)
    for kind, setting in (('auto-tag', 'AiConfig.openaiApiKey'), ('sync-ragflow', 'AiConfig.ragflowApiKey')):
        state = job_state(kind, note.id)
        assert state.status == 'failed' and state.attempts <= 1, kind  # sync fails before its claim
        assert state.last_error == ("PermanentError: %s, stored encrypted by the web app, does not decrypt "
                                    "with the key of ENCRYPTION_KEY: set ENCRYPTION_KEY to the web app's"
                                    % setting)
    assert model.chat_requests() == [] and ragflow.requests == []
    assert whitenote_huey.huey.scheduled_count() == 0  # no retry waiting
    for secret in (vector['ciphertext'], vector['plaintext'], VECTORS[1]['ciphertext'], VECTORS[1]['plaintext'],
                   'the wrong secret'):
        assert secret not in caplog.text
