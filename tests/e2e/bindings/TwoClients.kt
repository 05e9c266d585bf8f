// Two Kotlin clients of the generated bindings through a real relay process.
//
// Compiled and run by tests/e2e/bindings.rs as: java -Djna.library.path=<dir of
// libtern_ffi.so> -cp ... TwoClientsKt <relay> <work dir>. Prints "ok" at the end; any
// failed check throws (non-zero exit).

import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import uniffi.tern.*

const val STEP_MS = 20_000L // how long any one step may take

fun check(ok: Boolean, what: () -> String) {
    if (!ok) throw AssertionError(what())
}

// The exception `call` throws, which must be a T.
suspend inline fun <reified T : TernException> expectError(call: suspend () -> Unit): T {
    try {
        call()
    } catch (e: TernException) {
        check(e is T) { "expected ${T::class.simpleName}, got $e" }
        return e as T
    }
    throw AssertionError("no ${T::class.simpleName} thrown")
}

// The next Message event (Connected, Sent and the like are skipped).
suspend fun nextMessage(events: EventStream): Message {
    repeat(100) {
        val event = withTimeout(STEP_MS) { events.nextEvent() }
        check(event != null) { "the events ended" }
        if (event is TernEvent.Message) return event.message
    }
    throw AssertionError("no message among 100 events")
}

fun main(args: Array<String>) = runBlocking {
    val (relay, work) = args
    val (keyA, keyB) = ByteArray(32) { 1 } to ByteArray(32) { 2 }

    // A synchronous call's error is a typed exception too.
    expectError<TernException.InvalidContactCard> { parseContactCard("garbage") }

    val alice = register(relay, "$work/alice", keyA)
    val bob = register(relay, "$work/bob", keyB)
    check(alice.account().size == 16 && !alice.account().contentEquals(bob.account())) {
        "two accounts of 16 bytes"
    }
    val aliceCard = alice.contactCard()
    check(aliceCard.startsWith("tern-contact:")) { "a contact card: $aliceCard" }
    check(parseContactCard(aliceCard).account.contentEquals(alice.account())) { "the card's account" }
    val e = expectError<TernException.InvalidArgument> { alice.send(ByteArray(3), byteArrayOf()) }
    check("account id" in e.message) { "the reason names the account id: ${e.message}" }
    // The relay's refusal, with its code (a gateway the operator did not allowlist).
    val refused = expectError<TernException.Relay> {
        alice.setPushTarget(PushTarget.Gateway(url = "https://push.example/tern", deviceToken = "t0k3n"))
    }
    check(refused.code == "push target refused") { "the relay's code: ${refused.code}" }
    // (`relayMessage` in Kotlin: Throwable has a `message` already; ffi/bindgen.toml)
    check(refused.relayMessage.isNotEmpty()) { "the relay's explanation" }

    // A message from Alice to Bob, received as an event and confirmed.
    val bobId = alice.addContact(bob.contactCard())
    val aliceId = bob.addContact(aliceCard)
    check(bobId.contentEquals(bob.account()) && aliceId.contentEquals(alice.account())) { "contact ids" }
    val bobEvents = bob.events()
    alice.send(bobId, "hello bob from kotlin".toByteArray())
    val got = nextMessage(bobEvents)
    check(String(got.body) == "hello bob from kotlin" && got.sender.contentEquals(aliceId)) {
        "bob got ${String(got.body)}"
    }
    bob.confirm(got.seq)

    // Shut down and reopen: the wrong key is an exception, the right one the same account.
    bob.shutdown()
    check(withTimeout(STEP_MS) { drain(bobEvents) }) { "bob's events ended" }
    expectError<TernException.WrongStorageKey> { open("$work/bob", ByteArray(32) { 3 }) }
    val bobAgain = open("$work/bob", keyB)
    check(bobAgain.account().contentEquals(bobId)) { "the reopened account" }
    bobAgain.shutdown()
    alice.shutdown()
    println("ok")
}

// Reads events until they end (null); true once they have.
suspend fun drain(events: EventStream): Boolean {
    repeat(1000) { if (events.nextEvent() == null) return true }
    return false
}
