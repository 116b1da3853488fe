"""WireGuard keys: Curve25519 key pairs, as `wg` writes them (base64 of 32 bytes).

The private key lives in the state dir (`STATE/wireguard.key`, 0600, written atomically); it
is never logged: what the gateway shows of a key is `short()` of the public one.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from federation.files import write_atomic
from gateway.errors import GatewayError

KEY_FILE = "wireguard.key"


@dataclass(frozen=True)
class KeyPair:
    private: bytes  # 32 raw bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        return cls.from_private(X25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption()))

    @classmethod
    def from_private(cls, raw: bytes) -> KeyPair:
        pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw)
        return cls(raw, pub)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    def __repr__(self) -> str:  # never the private key, not even in a traceback
        return f"KeyPair(public={short(self.public_b64)})"


def short(public_b64: str) -> str:
    """The first 8 characters of a base64 public key (what status pages show)."""
    return public_b64[:8] + "…"


def b64_to_hex(key_b64: str) -> str:
    """A base64 key as the hex the UAPI wants."""
    return base64.b64decode(key_b64).hex()


def hex_to_b64(key_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(key_hex)).decode()


def load_or_create(state_dir: Path) -> KeyPair:
    """The key pair of STATE/wireguard.key, made (0600) if there is none."""
    path = state_dir / KEY_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        pair = KeyPair.generate()
        write_atomic(path, base64.b64encode(pair.private) + b"\n")
        return pair
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise ValueError("not 32 bytes")
    except (binascii.Error, ValueError) as e:
        raise GatewayError(f"{path}: not a WireGuard private key ({e}); remove it to make a "
                           "new one (peers then learn the new public key from the federation)"
                           ) from None
    return KeyPair.from_private(raw)


def write(state_dir: Path, pair: KeyPair) -> None:
    write_atomic(state_dir / KEY_FILE, base64.b64encode(pair.private) + b"\n")
