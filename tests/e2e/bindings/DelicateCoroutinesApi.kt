// Debian's kotlinx-coroutines (1.0.1, libkotlinx-coroutines-java) predates the
// @DelicateCoroutinesApi opt-in marker (1.5) the generated bindings name in an @OptIn.
// A marker annotation has no code behind it, so compiling with this declaration runs the
// same bytecode as with a newer library. Apps use a current kotlinx-coroutines-core and
// need no such file.
package kotlinx.coroutines

annotation class DelicateCoroutinesApi
