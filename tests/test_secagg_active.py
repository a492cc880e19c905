"""Secure aggregation against liars: wrong shares, inconsistent dealers, and an active server.

Each test attacks the protocol of ``fedfm.privacy.secagg`` as a malicious party would, and checks
that the attack is detected and the offender named (or, for the server, that the honest clients
refuse to go on).
"""

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedfm.privacy import secagg, shamir
from fedfm.privacy.secagg import (
    AdvertiseKeys,
    EncryptedShare,
    SecAggClient,
    SecAggError,
    SecAggParams,
    UnmaskResponse,
    agree,
    prg,
)
from fedfm.privacy.secagg_server import SecAggServer
from fedfm.privacy.signing import KeySigner, KeyVerifier

BITS, LENGTH = 32, 16


def cohort(n, signatures=False, threshold=0.67):
    params = SecAggParams(BITS, LENGTH, threshold, None, graph_seed=3, signatures=signatures, session=1)
    signers = {u: KeySigner() for u in range(n)}
    verifier = KeyVerifier({s.identity: f"site-{u}" for u, s in signers.items()})
    clients = {u: SecAggClient(u, params, signers[u], verifier) for u in range(n)}
    return params, clients


def inputs(n):
    g = torch.Generator().manual_seed(0)
    return {u: torch.randint(0, 1000, (LENGTH,), generator=g) for u in range(n)}


def setup(params, clients):
    server = SecAggServer(params)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    inbox = server.route_shares({u: c.share_keys(roster) for u, c in clients.items()})
    for u, c in clients.items():
        server.accused(u, c.receive_shares(inbox[u]))
    return server


def mask_all(server, clients, xs, skip=()):
    for u, c in clients.items():
        if u not in skip:
            m = c.mask(xs[u])
            assert server.input_problem(m) is None
            server.collect_input(m)


def unmasked(server, clients, xs):
    """Every client masks its input; the survivors unmask; the server's recovered sum."""
    mask_all(server, clients, xs)
    request = server.unmask_request()
    return server.finish([clients[u].unmask(request) for u in request.survivors], request)


def test_a_holder_that_returns_a_wrong_share_is_named_and_the_sum_still_comes_out():
    params, clients = cohort(5)
    xs = inputs(5)
    server = setup(params, clients)
    mask_all(server, clients, xs)
    request = server.unmask_request()
    responses = [clients[u].unmask(request) for u in request.survivors]
    value, salt = responses[2].self_mask_shares[0]
    responses[2].self_mask_shares[0] = (value + 1, salt)  # off by one: silently wrong before
    total = server.finish(responses, request)
    assert torch.equal(total, sum(xs.values()) % (1 << BITS))
    assert server.offenders == [
        {
            "client": 2,
            "reason": "returned a share of client 0's secret that does not open its commitment; "
            "share discarded",
        }
    ]


def test_a_dealer_of_inconsistent_shares_is_named():
    """Client 0 commits honestly to shares that lie on no single polynomial: every holder's share
    opens its commitment, but more than t of them disagree, and the dealer is named."""
    params, clients = cohort(5)
    liar = clients[0]
    honest_share = secagg.shamir_share

    def bad_share(secret, threshold, holders):
        shares = honest_share(secret, threshold, holders)
        shares[holders[-1]] = (shares[holders[-1]] + 7) % shamir.PRIME
        return shares

    server = SecAggServer(params)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    outgoing = {}
    for u, c in clients.items():
        if c is liar:
            secagg.shamir_share = bad_share
        try:
            outgoing[u] = c.share_keys(roster)
        finally:
            secagg.shamir_share = honest_share
    inbox = server.route_shares(outgoing)
    for u, c in clients.items():
        assert c.receive_shares(inbox[u]) == []  # each share matches what was committed
    xs = inputs(5)
    mask_all(server, clients, xs)
    request = server.unmask_request()
    with pytest.raises(SecAggError, match="client 0 dealt shares of no single secret"):
        server.finish([clients[u].unmask(request) for u in request.survivors], request)
    assert {"client": 0, "reason": "client 0 dealt shares of no single secret"} in server.offenders


def test_a_dealer_whose_shares_break_their_commitments_is_named_and_the_round_goes_on():
    params, clients = cohort(5, threshold=0.6)  # t = 3: the holder without a usable share is not needed
    server = SecAggServer(params)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    outgoing = {u: c.share_keys(roster) for u, c in clients.items()}
    forged = outgoing[4][0]  # client 4 shows the server a commitment to something it did not send
    bad = (b"x" * 32,) * 2
    outgoing[4][0] = EncryptedShare(forged.sender, forged.receiver, forged.nonce, forged.ciphertext, bad)
    inbox = server.route_shares(outgoing)
    for u, c in clients.items():
        server.accused(u, c.receive_shares(inbox[u]))
    assert [o["client"] for o in server.offenders] == [4]
    xs = inputs(5)
    assert torch.equal(unmasked(server, clients, xs), sum(xs.values()) % (1 << BITS))


def test_a_client_that_accuses_everyone_spoils_nothing():
    """A holder that claims every dealer's share was bad: taken as "it holds no share of theirs",
    which the threshold absorbs; an accusation about a share never routed to it names the accuser."""
    params, clients = cohort(5, threshold=0.6)
    server = setup(params, clients)
    server.accused(1, [0, 2, 3, 4, 99])
    assert {"client": 1, "reason": "accused client 99 of a share it was never sent"} in server.offenders
    xs = inputs(5)
    assert torch.equal(unmasked(server, clients, xs), sum(xs.values()) % (1 << BITS))


def test_a_degenerate_key_is_refused_before_anyone_uses_it():
    params, clients = cohort(4)
    adverts = [c.advertise() for c in clients.values()]
    a = adverts[2]
    adverts[2] = AdvertiseKeys(a.client, bytes(32), a.mask_public)  # a low-order point: every exchange fails
    server = SecAggServer(params)
    roster = server.collect_keys(adverts)
    assert set(roster) == {0, 1, 3}
    assert server.offenders == [{"client": 2, "reason": "advertised a degenerate X25519 public key"}]
    with pytest.raises(SecAggError, match="unusable keys of clients \\[2\\]"):
        clients[0].share_keys({u: a for u, a in zip(range(4), adverts, strict=True)})


def test_malformed_share_messages_name_their_sender():
    params, clients = cohort(4)
    server = SecAggServer(params)
    roster = server.collect_keys([c.advertise() for c in clients.values()])
    outgoing = {u: c.share_keys(roster) for u, c in clients.items()}
    outgoing[1] = outgoing[1][:1]  # shares for one neighbour only
    s = outgoing[2][0]
    outgoing[2][0] = EncryptedShare(3, s.receiver, s.nonce, s.ciphertext, s.commitments)  # "from client 3"
    server.route_shares(outgoing)
    assert server.shared == {0, 3}
    assert {o["client"]: o["reason"] for o in server.offenders} == {
        1: "did not send exactly one share to each of its neighbours",
        2: "sent a share claiming to come from another client",
    }


class ManInTheMiddle:
    """An active server: it replaces every client's advertised keys with its own, re-encrypts the
    shares it routes, and so learns every share and every pairwise mask."""

    def __init__(self, roster, params):
        self.params, self.real = params, roster
        self.fake = {u: (X25519PrivateKey.generate(), X25519PrivateKey.generate()) for u in roster}
        self.shares = {}

    def roster(self):
        raw = {"encoding": secagg.serialization.Encoding.Raw, "format": secagg.serialization.PublicFormat.Raw}
        return {
            u: AdvertiseKeys(
                u,
                c.public_key().public_bytes(**raw),
                m.public_key().public_bytes(**raw),
                a.identity,
                a.signature,
            )
            for (u, a), (c, m) in zip(self.real.items(), self.fake.values(), strict=True)
        }

    def reroute(self, outgoing):
        inbox = {u: [] for u in outgoing}
        for w, shares in outgoing.items():
            for s in shares:
                v = s.receiver
                key_in = agree(self.fake[v][0], self.real[w].cipher_public, b"share")
                plain = AESGCM(key_in).decrypt(s.nonce, s.ciphertext, secagg.struct.pack("<II", w, v))
                self.shares[(w, v)] = int.from_bytes(plain[8 : 8 + 66], "little")  # share of b_w
                key_out = agree(self.fake[w][0], self.real[v].cipher_public, b"share")
                inbox[v].append(
                    EncryptedShare(
                        w,
                        v,
                        s.nonce,
                        AESGCM(key_out).encrypt(s.nonce, plain, secagg.struct.pack("<II", w, v)),
                        s.commitments,
                    )
                )
        return inbox

    def recover(self, target, masked, clients):
        t = secagg.threshold_for(len(clients), self.params.threshold)
        shares = {v: self.shares[(target, v)] for v in clients if (target, v) in self.shares}
        seed = shamir.reconstruct(shares, t).to_bytes(32, "little")
        x = masked - prg(seed, LENGTH, BITS)
        for v in clients:
            if v != target:
                p = prg(agree(self.fake[v][1], self.real[target].mask_public, b"mask"), LENGTH, BITS)
                x = x - p if target < v else x + p
        return x % (1 << BITS)


@pytest.mark.parametrize("signatures", [False, True])
def test_a_server_that_swaps_keys_learns_one_input_unless_adverts_are_signed(signatures):
    params, clients = cohort(5, signatures=signatures)
    xs = inputs(5)
    adverts = {u: c.advertise() for u, c in clients.items()}
    mitm = ManInTheMiddle(adverts, params)
    fake_roster = mitm.roster()
    if signatures:  # every honest client checks every advert's signature before sharing anything
        for c in clients.values():
            with pytest.raises(SecAggError, match="carry no valid signature"):
                c.share_keys(fake_roster)
        return
    outgoing = {u: c.share_keys(fake_roster) for u, c in clients.items()}
    inbox = mitm.reroute(outgoing)
    for u, c in clients.items():
        c.receive_shares(inbox[u])
    masked = clients[0].mask(xs[0]).vector
    assert torch.equal(mitm.recover(0, masked, clients), xs[0])  # the attack works without signatures


def test_a_server_that_names_different_survivors_to_different_clients_is_refused():
    params, clients = cohort(6, signatures=True, threshold=0.51)
    server = setup(params, clients)
    xs = inputs(6)
    mask_all(server, clients, xs)
    honest = sorted(server.survivors)
    # the server tells clients 0–2 that client 5 dropped, and clients 3–5 that everyone survived
    told = {u: [v for v in honest if v != 5] if u < 3 else honest for u in honest}
    signatures = {u: clients[u].sign_survivors(told[u]) for u in honest}
    for u in honest:
        request = secagg.UnmaskRequest(
            tuple(told[u]), tuple(v for v in honest if v not in told[u]), signatures
        )
        with pytest.raises(
            SecAggError, match="consistency check failed: 3 valid survivor signatures, 4 needed"
        ):
            clients[u].unmask(request)
    with pytest.raises(SecAggError, match="second, different survivor list"):
        clients[0].sign_survivors(honest)  # and a client signs only one list per round


def test_signed_rounds_recover_the_sum():
    params, clients = cohort(5, signatures=True)
    server = setup(params, clients)
    xs = inputs(5)
    mask_all(server, clients, xs, skip=(3,))
    survivors = sorted(server.survivors)
    request = server.unmask_request({u: clients[u].sign_survivors(survivors) for u in survivors})
    responses = [clients[u].unmask(request) for u in request.survivors]
    assert isinstance(responses[0], UnmaskResponse)
    total = server.finish(responses, request)
    assert torch.equal(total, sum(xs[u] for u in survivors) % (1 << BITS))


def test_one_badly_signed_advert_is_dropped_by_the_server_and_spoils_nothing():
    params, clients = cohort(5, signatures=True)
    verifier = clients[0].verifier
    server = SecAggServer(params, verifier=verifier, names={u: f"site-{u}" for u in clients})
    adverts = [c.advertise() for c in clients.values()]
    a = adverts[4]
    adverts[4] = AdvertiseKeys(a.client, a.cipher_public, a.mask_public, a.identity, b"\0" * 64)
    roster = server.collect_keys(adverts)
    assert set(roster) == {0, 1, 2, 3}
    assert server.offenders == [
        {"client": 4, "reason": "advertised keys without a valid signature by this site's identity"}
    ]
    honest = {u: clients[u] for u in roster}
    inbox = server.route_shares({u: c.share_keys(roster) for u, c in honest.items()})
    for u, c in honest.items():
        c.receive_shares(inbox[u])
    xs = inputs(5)
    mask_all(server, honest, xs)
    survivors = sorted(server.survivors)
    request = server.unmask_request({u: honest[u].sign_survivors(survivors) for u in survivors})
    total = server.finish([honest[u].unmask(request) for u in survivors], request)
    assert torch.equal(total, sum(xs[u] for u in survivors) % (1 << BITS))
