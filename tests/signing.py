"""
Test helper: the headers of an asynchronous command signed as the management node signs it
(L{agent.protocol.sign_command}: path, callback URL, expiry, task uuid and body).
"""

from __future__ import annotations

import urllib.parse

from agent import protocol as p


def command_path(url: str) -> str:
    """
    The command path of C{url} (C{http://agent/hosts/3/vm/stop} -> C{/vm/stop}).
    """
    path = urllib.parse.urlsplit(url).path
    if path.startswith(p.HOSTS_PREFIX):
        path = "/" + path[len(p.HOSTS_PREFIX):].partition("/")[2]
    return path


def command_headers(secret: str, url: str, taskuuid: str, body: bytes, callback_url: str,
                    expiry: float = 300.0, path: str | None = None) -> dict[str, str]:
    """
    The C{taskuuid}, C{callbackurl}, expiry and signature headers of a command to C{url}
    (signed for C{path} if given, else for C{url}'s command path).
    """
    text = p.format_expiry(expiry)
    return {
        p.TASK_UUID_HEADER: taskuuid,
        p.CALLBACK_URL_HEADER: callback_url,
        p.EXPIRY_HEADER: text,
        p.SIGNATURE_HEADER: p.sign_command(secret, path or command_path(url), taskuuid,
                                           callback_url, text, body),
    }
