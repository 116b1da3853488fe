"""The cluster's identity in a gateway: its CA(s), our SVID, our bundle, and CA rotation.

Theory of operation
-------------------
- The CAs. `identity.ca_cert_file` + `ca_key_file` (the operator's), else the state dir's
  `identity/ca.pem` + `ca-key.pem` (made at the first start). Either certificate file may hold
  several CA certificates (`federation.ca.load_ca_set`): the one whose key is the key file's
  signs, every one is trusted and published in our bundle. That is how an operator with a CA of
  their own overlaps two CAs; for the state dir's CA, `isthmus identity rotate-ca` does it.
- Rotation (state dir CA only). `rotate-ca` (`plan_rotation`) writes the new CA as
  `ca-next.pem` + `ca-next-key.pem`, then the plan `rotation.json`; which CA signs and which
  are trusted at any time is `gateway.core.ca_rotation.decide(plan, now)`. `refresh(now)` (the
  agent calls it every second) rereads the plan when the file changed and applies what
  `decide` says: a new signer reissues the SVID at once, a new trusted set makes a new bundle.
  The primary records in the plan when the federation accepted the prepare bundle
  (`published`) and performs the retire: the old CA's files are copied to `archive/` (key
  0600), the new CA's replace `ca.pem` and `ca-key.pem`, the plan is deleted, then the
  `ca-next` files. A crash on the way is finished at the next start (the plan and the ca-next
  files are still there). Workers (`persist=False`) only read: they follow the same plan on the
  same clock and write nothing; a retire they see before the primary finished it is applied in
  memory (the new CA alone) until the plan is gone and `ca.pem` holds the new CA.
- The bundle sequence (`bundle.json`: the sequence and the SHA-256 fingerprints of the
  authorities in the bundle) goes up by one whenever the set of trusted authorities changes,
  and to whatever the federation says it must exceed (`raise_sequence`: a state dir restored
  from a backup). A state dir from before (`{"sequence", "ca"}`) keeps its sequence.
- Messages: a bad CA file is a ConfigError naming the field and the certificate's place in the
  file; a bad plan is logged (ERROR, once per version of the file) and ignored.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from federation.ca import CertificateAuthority, fingerprint, load_ca_set
from federation.errors import IdentityError, InputError, IsthmusError
from federation.files import private_dir, write_atomic
from federation.identity import CLOCK_SKEW, Svid, TrustBundle, gateway_id, verify_svid
from federation.units import format_duration
from gateway.config.schema import GatewayConfig, check_overlap
from gateway.core.ca_rotation import Phase, RotationPlan, RotationState, decide
from gateway.errors import ConfigError, GatewayError, Problem

log = logging.getLogger("isthmus.gateway.identity")

CA_CERT, CA_KEY = CertificateAuthority.CERT_FILE, CertificateAuthority.KEY_FILE
PLAN_FILE = "rotation.json"
NEXT_CERT, NEXT_KEY = "ca-next.pem", "ca-next-key.pem"
BUNDLE_FILE = "bundle.json"
ARCHIVE_DIR = "archive"
MAX_FILE = 1 << 20  # a CA or plan file larger than this is refused


@dataclass(frozen=True)
class CaSet:
    """The CA that signs and every authority trusted with it (DER, the signer's included)."""

    signer: CertificateAuthority
    trusted: tuple[bytes, ...]


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE:
        raise IdentityError(f"{path}: larger than {MAX_FILE} bytes")
    return data


def load_ca_files(cert: Path, key: Path, td: str, now: float) -> CaSet:
    signer, trusted = load_ca_set(_read(cert), _read(key), td, now, str(cert), str(key))
    return CaSet(signer, trusted)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_plan(directory: Path) -> RotationPlan | None:
    """The plan in `directory`, None if there is none; InputError/IdentityError if malformed."""
    path = directory / PLAN_FILE
    if not path.exists():
        return None
    try:
        obj = json.loads(_read(path))
    except ValueError as e:
        raise InputError(f"{path}: not JSON ({e})") from None
    return RotationPlan.from_json(obj, str(path))


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class Identity:
    """The cluster CA(s), our current SVID and our bundle (sequence persisted in the state dir).
    The clock is a parameter (`now`) of every method that needs it."""

    def __init__(self, cfg: GatewayConfig, now: float, persist: bool = True) -> None:
        self.cfg = cfg
        self.persist = persist  # False in extra workers: they only read the state dir
        self.dir = cfg.state_dir / "identity"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ic = cfg.identity
        self.td = cfg.cluster.trust_domain
        self.own_ca = ic.ca_cert_file is None  # the state dir's CA: the one rotate-ca rotates
        self.refresh_hint = max(1, math.ceil(ic.bundle_refresh_hint))
        if not persist and self.own_ca and not (self.dir / CA_CERT).exists():
            raise GatewayError(f"{self.dir}: no cluster CA to issue from (a worker never creates "
                               "one; its primary does, before it starts the workers)")
        self.plan: RotationPlan | None = None
        self.state: RotationState | None = None
        self.next: CertificateAuthority | None = None
        self._plan_stamp: tuple[int, int, int] | None = None
        if self.own_ca:
            self._plan_stamp = _stamp(self.dir / PLAN_FILE)
            self.plan = self._load_plan()
            if self.plan is not None and persist and decide(self.plan, now).phase is Phase.RETIRE:
                self._finish_retire(self.plan)  # due while we were stopped, or interrupted
                self.plan, self._plan_stamp = None, None
        self.current = self._load_current(now)
        if self.plan is not None and not self._adopt(self.plan, now):
            self.plan = None
        self.ca = self.current.signer
        self.bundle: TrustBundle | None = None
        self._apply(now)
        svid = Svid.load(self.dir)
        if svid is None or svid.rotation_due(now) or not self._issued_by_ca(svid, now):
            svid = self.issue(now)
        self.svid = svid

    # -- loading -------------------------------------------------------------------------------
    def _load_current(self, now: float) -> CaSet:
        ic = self.cfg.identity
        if not self.own_ca:
            assert ic.ca_cert_file is not None and ic.ca_key_file is not None
            try:
                return load_ca_files(ic.ca_cert_file, ic.ca_key_file, self.td, now)
            except IdentityError as e:
                raise ConfigError([Problem(str(self.cfg.source), None, "identity.ca_cert_file",
                                           str(e))]) from None
        cert, key = self.dir / CA_CERT, self.dir / CA_KEY
        if not cert.exists() and not key.exists():
            ca = CertificateAuthority.load_or_create(self.dir, self.td, now)  # a new CA
            return CaSet(ca, (ca.cert_der,))
        if cert.exists() != key.exists():
            CertificateAuthority.load_or_create(self.dir, self.td, now)  # raises, naming it
        return load_ca_files(cert, key, self.td, now)

    def _load_plan(self) -> RotationPlan | None:
        try:
            return read_plan(self.dir)
        except IsthmusError as e:
            log.error("ignoring the CA rotation plan: %s", e)
            return None

    def _adopt(self, plan: RotationPlan, now: float) -> bool:
        """Load the plan's new CA (ca-next files); False (logged) if the plan does not fit."""
        try:
            ca = load_ca_files(self.dir / NEXT_CERT, self.dir / NEXT_KEY, self.td, now).signer
        except IdentityError as e:
            log.error("ignoring the CA rotation plan %s: its new CA: %s", self.dir / PLAN_FILE, e)
            return False
        have = self.current.signer.fingerprint
        if ca.fingerprint != plan.new or have not in (plan.old, plan.new):
            log.error("ignoring the CA rotation plan %s: it rotates %s to %s, but the CA in %s is "
                      "%s and the one in %s is %s", self.dir / PLAN_FILE, plan.old[:16],
                      plan.new[:16], CA_CERT, have[:16], NEXT_CERT, ca.fingerprint[:16])
            return False
        self.next = ca
        hint = self.cfg.identity.bundle_refresh_hint
        if (why := check_overlap(plan.overlap, hint)) is not None:
            log.warning("CA rotation plan %s: overlap %s", self.dir / PLAN_FILE, why)
        return True

    # -- following the plan --------------------------------------------------------------------
    def _decide(self, now: float) -> tuple[CertificateAuthority, TrustBundle, RotationState | None]:
        """The signer and our bundle at `now` (the bundle's sequence decided, not persisted)."""
        signer, trusted, st = self.current.signer, self.current.trusted, None
        if self.plan is not None and self.next is not None:
            st = decide(self.plan, now)
            if st.phase is Phase.PREPARE:
                trusted = (*trusted, self.next.cert_der)
            elif st.phase is Phase.SWITCH:
                signer, trusted = self.next, (*trusted, self.next.cert_der)
            else:
                signer, trusted = self.next, (self.next.cert_der,)
            trusted = tuple(dict.fromkeys(trusted))
        return signer, self._bundle_for(trusted, write=False), st

    def _apply(self, now: float) -> bool:
        """Make the signer and the bundle what the plan says at `now`; True if the signer
        changed (the caller reissues the SVID)."""
        signer, bundle, st = self._decide(now)
        if st is not None and st.phase is Phase.RETIRE and self.persist:
            assert self.plan is not None and self.next is not None
            old, new = self.plan.old, self.next
            self._finish_retire(self.plan)
            self.plan, self.next, self._plan_stamp = None, None, None
            self.current = CaSet(new, (new.cert_der,))
            signer, bundle, st = self._decide(now)
            self._say("CA rotation: retire: bundle sequence %d trusts the new CA %s only; the "
                      "old CA %s is archived in %s", bundle.sequence, new.fingerprint[:16],
                      old[:16], self.dir / ARCHIVE_DIR)
        elif st is not None and (self.state is None or st.phase != self.state.phase):
            self._say_phase(st, bundle)
        self.state = st
        self.bundle = self._bundle_for(bundle.authorities, write=True)
        changed = signer.fingerprint != self.ca.fingerprint
        self.ca = signer
        return changed

    def _say(self, msg: str, *args: Any) -> None:
        log.log(logging.INFO if self.persist else logging.DEBUG, msg, *args)

    def _say_phase(self, st: RotationState, bundle: TrustBundle) -> None:
        assert self.plan is not None
        old, new = self.plan.old[:16], self.plan.new[:16]
        if st.phase is Phase.PREPARE:
            self._say("CA rotation: prepare: bundle sequence %d trusts the old CA %s and the new "
                      "CA %s; the old one signs until %s", bundle.sequence, old, new,
                      _when(st.switch_at) if st.switch_at is not None else
                      f"the federation has this bundle, plus {format_duration(self.plan.overlap)}")
        elif st.phase is Phase.SWITCH:
            self._say("CA rotation: switch: the new CA %s signs (SVID reissued); the old CA %s "
                      "stays trusted until %s", new, old, _when(st.retire_at))

    def refresh(self, now: float) -> bool:
        """Follow the plan file (reread when it changed) and the clock; True if the signer
        changed, so the SVID was reissued. Compare `bundle` to see whether it changed."""
        if self.own_ca:
            stamp = _stamp(self.dir / PLAN_FILE)
            if stamp != self._plan_stamp:
                self._plan_stamp = stamp
                self._reread_plan(now)
        if self._apply(now):
            self.issue(now)
            return True
        return False

    def _reread_plan(self, now: float) -> None:
        plan = self._load_plan() if self._plan_stamp is not None else None
        if plan is None and self._plan_stamp is not None:
            return  # malformed (logged): keep following what we had
        if plan is None:  # removed: the primary retired it (or it was deleted by hand)
            if self.plan is None:
                return
            try:
                self.current = self._load_current(now)
            except IsthmusError as e:
                log.debug("CA files not settled yet (%s); retrying", e)
                self._plan_stamp = (-1, -1, -1)  # look again at the next refresh
                return
            self.plan, self.next = None, None
            if self.persist:
                log.warning("the CA rotation plan %s was removed before it was done; signing "
                            "with the CA in %s", self.dir / PLAN_FILE, CA_CERT)
            return
        if self.plan is not None and plan.new == self.plan.new:
            self.plan = plan  # e.g. prepared_at recorded by the primary
            return
        if self._adopt(plan, now):
            self.plan, self.state = plan, None

    def published(self, bundle: TrustBundle, now: float) -> bool:
        """The federation accepted `bundle`: if it is the prepare bundle of a plan, record the
        time (the switch comes `overlap` later). True if the plan changed."""
        plan = self.plan
        if (plan is None or plan.prepared_at is not None or not self.persist
                or self.next is None or self.next.cert_der not in bundle.authorities):
            return False
        self.plan = plan.prepared(now)
        try:
            write_atomic(self.dir / PLAN_FILE, json.dumps(self.plan.to_json()).encode(), 0o644)
        except OSError as e:  # a failing disk: this process goes on; its workers cannot follow
            log.error("cannot record in %s that the federation has the new CA: %s",
                      self.dir / PLAN_FILE, e)
        self._plan_stamp = _stamp(self.dir / PLAN_FILE)
        st = decide(self.plan, now)
        self._say("CA rotation: the federation holds bundle sequence %d with the new CA; it "
                  "signs from %s (in %s)", bundle.sequence, _when(st.switch_at),
                  format_duration(self.plan.overlap))
        self.state = st
        return True

    def _finish_retire(self, plan: RotationPlan) -> None:
        """Archive the old CA, put the new one in ca.pem/ca-key.pem, delete the plan, then the
        ca-next files. Each step can be redone: a crash is finished at the next start."""
        d = self.dir
        cert, key = d / CA_CERT, d / CA_KEY
        next_cert, next_key = d / NEXT_CERT, d / NEXT_KEY
        if next_cert.exists():
            arch = private_dir(d / ARCHIVE_DIR)
            a_cert, a_key = arch / f"ca-{plan.old[:16]}.pem", arch / f"ca-{plan.old[:16]}-key.pem"
            if not a_key.exists():  # nothing was overwritten yet: these are the old CA's files
                write_atomic(a_cert, _read(cert), 0o644)
                write_atomic(a_key, _read(key), 0o600)
            if next_key.exists():
                write_atomic(key, _read(next_key), 0o600)
            write_atomic(cert, _read(next_cert), 0o644)
        (d / PLAN_FILE).unlink(missing_ok=True)
        next_key.unlink(missing_ok=True)
        next_cert.unlink(missing_ok=True)

    # -- sequence ------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        try:
            obj = json.loads((self.dir / BUNDLE_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("%s unreadable (%s); the bundle sequence starts again from it",
                        self.dir / BUNDLE_FILE, e)
            return {}
        return obj if isinstance(obj, dict) else {}

    def _bundle_for(self, trusted: tuple[bytes, ...], write: bool) -> TrustBundle:
        """Our bundle of `trusted`, its sequence raised by one if the set changed (persisted
        when `write` and we are the writer)."""
        held = self.bundle
        if held is not None and set(held.authorities) == set(trusted):
            return replace(held, authorities=trusted) if held.authorities != trusted else held
        fps = sorted(fingerprint(der) for der in trusted)
        meta = self._meta()
        seq = meta.get("sequence", 0)
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0
        legacy = len(trusted) == 1 and meta.get("ca") == trusted[0].hex()[-64:]
        same = meta.get("authorities") == fps or legacy
        if not same:
            seq += 1
        if write and self.persist and (not same or legacy):
            self._write_meta(seq, fps)
        return TrustBundle(self.td, trusted, seq, self.refresh_hint)

    def _write_meta(self, seq: int, fps: list[str]) -> None:
        write_atomic(self.dir / BUNDLE_FILE,
                     json.dumps({"sequence": seq, "authorities": fps}).encode())

    def _bundle(self) -> TrustBundle:
        """Now the writer of the state dir (a takeover): persist the bundle as it is."""
        if self.persist:
            self._write_meta(self.bundle.sequence,
                             sorted(fingerprint(d) for d in self.bundle.authorities))
        return self.bundle

    def raise_sequence(self, at_least: int) -> None:
        """The federation holds a bundle we must exceed: ours is published at `at_least`."""
        if at_least <= self.bundle.sequence:
            return
        self.bundle = replace(self.bundle, sequence=at_least)
        if self.persist:
            self._write_meta(at_least, sorted(fingerprint(d) for d in self.bundle.authorities))

    # -- SVIDs ---------------------------------------------------------------------------------
    def _issued_by_ca(self, svid: Svid, now: float) -> bool:
        try:
            verify_svid(svid.cert_der(), TrustBundle(self.td, (self.ca.cert_der,), 0), now)
            return True
        except IsthmusError:
            return False

    def issue(self, now: float) -> Svid:
        svid = self.ca.issue(gateway_id(self.td), now, self.cfg.identity.svid_ttl)
        if self.persist:
            svid.write(self.dir)
        self.svid = svid
        log.info("issued SVID %s serial %x, valid until %.0f (CA %s)", svid.spiffe_id,
                 svid.serial, svid.not_after, self.ca.fingerprint[:16])
        return svid

    # -- introspection -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        ic = self.cfg.identity
        out: dict[str, Any] = {
            "ca_source": "state_dir" if self.own_ca else str(ic.ca_cert_file),
            "authorities": [_describe(der, self.ca) for der in self.bundle.authorities],
            "bundle_sequence": self.bundle.sequence,
            "refresh_hint": self.refresh_hint,
            "rotation": None,
        }
        if self.plan is not None and self.state is not None:
            st, p = self.state, self.plan
            out["rotation"] = {"phase": str(st.phase), "old": p.old, "new": p.new,
                               "overlap": p.overlap, "created_at": p.created_at,
                               "prepared_at": p.prepared_at, "switch_at": st.switch_at,
                               "retire_at": st.retire_at, "next_at": st.next_at}
        return out


def _describe(der: bytes, signer: CertificateAuthority) -> dict[str, Any]:
    cert = x509.load_der_x509_certificate(der)
    return {"fingerprint": fingerprint(der), "subject": cert.subject.rfc4514_string(),
            "not_after": cert.not_valid_after_utc.timestamp(),
            "signs": der == signer.cert_der}


# -- the operator's side (isthmus identity rotate-ca / status) --------------------------------


def plan_rotation(cfg: GatewayConfig, now: float, overlap: float | None = None,
                  clock_skew: float = CLOCK_SKEW) -> tuple[RotationPlan, CertificateAuthority]:
    """Write a new CA (ca-next files, key 0600) and then the plan into the state dir; the
    running gateway picks it up within a second, a stopped one when it starts. Returns the plan
    and the current CA. ConfigError/InputError for what the operator must change (exit 2),
    GatewayError when the state dir is not ready for it (exit 1)."""
    ic = cfg.identity
    if ic.ca_cert_file is not None:
        raise ConfigError([Problem(
            str(cfg.source), None, "identity.ca_cert_file",
            f"the CA is yours ({ic.ca_cert_file}), so rotate-ca does not touch it; rotate it "
            "with overlap by hand: put the new CA certificate into ca_cert_file next to the old "
            "one (both are trusted and published; the one matching ca_key_file signs), restart, "
            f"wait at least rotation_overlap ({format_duration(ic.rotation_overlap)}), point "
            "ca_key_file at the new key, restart, wait until every SVID of the old CA expired "
            f"(svid_ttl {format_duration(ic.svid_ttl)}), then remove the old certificate")])
    overlap = ic.rotation_overlap if overlap is None else overlap
    if (why := check_overlap(overlap, ic.bundle_refresh_hint)) is not None:
        raise InputError(f"--overlap: {why} (identity.bundle_refresh_hint)")
    if clock_skew < 0:
        raise InputError(f"--clock-skew: {clock_skew!r} must not be negative")
    d = cfg.state_dir / "identity"
    cert, key = d / CA_CERT, d / CA_KEY
    if not cert.exists():
        raise GatewayError(f"{cert} does not exist: the gateway has not created its CA yet (start "
                           "it once, then rotate)")
    try:
        current = load_ca_files(cert, key, cfg.cluster.trust_domain, now)
        existing = read_plan(d)
    except IsthmusError as e:
        raise GatewayError(str(e)) from None
    if existing is not None:
        st = decide(existing, now)
        raise GatewayError(f"a CA rotation is already under way ({d / PLAN_FILE}: phase "
                           f"{st.phase}, next step {_when(st.next_at)}); see `isthmus identity "
                           "status`")
    new = CertificateAuthority.create(cfg.cluster.trust_domain, now)
    new.write(d / NEXT_CERT, d / NEXT_KEY)
    plan = RotationPlan(current.signer.fingerprint, new.fingerprint, now, overlap,
                        ic.svid_ttl, clock_skew)
    write_atomic(d / PLAN_FILE, json.dumps(plan.to_json()).encode(), 0o644)
    return plan, current.signer


def describe_state(cfg: GatewayConfig, now: float) -> dict[str, Any]:
    """What `isthmus identity status` prints, read from the state dir (nothing is written):
    the phase, every CA with its role, the bundle sequence, the next step."""
    d, ic, td = cfg.state_dir / "identity", cfg.identity, cfg.cluster.trust_domain
    own = ic.ca_cert_file is None
    cert, key = (d / CA_CERT, d / CA_KEY) if own else (ic.ca_cert_file, ic.ca_key_file)
    assert cert is not None and key is not None
    if not cert.exists():
        raise GatewayError(f"{cert} does not exist: the gateway has not created its CA yet")
    try:
        current = load_ca_files(cert, key, td, now)
        plan = read_plan(d) if own else None
        nxt = load_ca_files(d / NEXT_CERT, d / NEXT_KEY, td, now).signer if plan else None
    except IsthmusError as e:
        raise GatewayError(str(e)) from None
    st = decide(plan, now) if plan is not None else None
    signs = st.signer if st is not None else current.signer.fingerprint
    trusted = set(st.trusted) if st is not None else None
    rows = []
    for der in dict.fromkeys([*current.trusted, *([nxt.cert_der] if nxt else [])]):
        fp = fingerprint(der)
        row = _describe(der, current.signer)
        row["signs"] = fp == signs
        row["trusted"] = trusted is None or fp in trusted or fp not in (plan.old, plan.new)
        row["role"] = "new" if plan and fp == plan.new else "old" if plan and fp == plan.old else ""
        rows.append(row)
    try:
        meta = json.loads((d / BUNDLE_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    return {
        "trust_domain": td,
        "ca_source": "state_dir" if own else str(ic.ca_cert_file),
        "bundle_sequence": meta.get("sequence") if isinstance(meta, dict) else None,
        "refresh_hint": max(1, math.ceil(ic.bundle_refresh_hint)),
        "authorities": rows,
        "phase": str(st.phase) if st is not None else None,
        "plan": plan.to_json() if plan is not None else None,
        "switch_at": st.switch_at if st else None,
        "retire_at": st.retire_at if st else None,
        "next_at": st.next_at if st else None,
    }
