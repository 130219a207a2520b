"""Two processes x two users, interleaved turns: every message lands in its own user's
session, once. Turns of one user alternate between the processes (a user's next turn
starts when the previous one is done); the users' turns run side by side. Greetings are
identical, later messages share a prefix, and turns mix a full memory, a trimmed window
of it, and a streamed chat."""

import os
import subprocess
import sys
import textwrap

from llama_index.llms.megacontext import MegaContextLLM

TURNS = int(os.environ.get("MC_STRESS_TURNS", "6"))
USERS = ("alice", "bob")
FAST = {"gist_refine_steps": 0}

WORKER = textwrap.dedent(
    """
    import pathlib, sys, time
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.llms.megacontext import MegaContextLLM
    from llama_index.memory.megacontext import MegaContextMemory

    store, me, turns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    done = pathlib.Path(store) / "done"
    llm = MegaContextLLM(store=store, working_budget=512, max_tokens=1,
                         engine_kwargs={"gist_refine_steps": 0})

    def text(user, t):
        return "Hi" if t == 0 else f"Tell me about turn {t} of {user}."

    for t in range(turns):
        for i, user in enumerate(("alice", "bob")):
            if (t + i) % 2 != me:
                continue
            while t and not (done / f"{user}.{t - 1}").exists():
                time.sleep(0.02)
            memory = MegaContextMemory.from_defaults(session_id=user, llm=llm)
            memory.put(ChatMessage(role="user", content=text(user, t)))
            history = memory.get()
            system = ChatMessage(role="system", content=f"The user is {user}.")
            if t % 3 == 0:
                reply = llm.chat([system, *history])
            elif t % 3 == 1:
                reply = llm.chat(history[-3:])
            else:
                reply = list(llm.stream_chat([system, *history]))[-1]
            assert reply.raw["session_id"] == user, reply.raw
            memory.put(reply.message)
            done.mkdir(exist_ok=True)
            (done / f"{user}.{t}").touch()
    """
)


def test_two_processes_two_users_interleaved(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(me), str(TURNS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for me in (0, 1)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    llm = MegaContextLLM(store=str(tmp_path), working_budget=512, engine_kwargs=FAST)
    for user in USERS:
        log = llm.engine.session(user).messages()
        users = [m.content for m in log if m.role == "user"]
        expected = ["Hi"] + [f"Tell me about turn {t} of {user}." for t in range(1, TURNS)]
        assert users == expected  # each once, in order, none lost
        assert sum(m.role == "assistant" for m in log) == TURNS
        other = next(u for u in USERS if u != user)
        assert not any(other in m.content for m in log)
    assert sorted(llm.engine.sessions()) == sorted(USERS)  # no stray session
