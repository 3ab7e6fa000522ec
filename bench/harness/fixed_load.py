"""Fixed-count load for bench/instructions.sh: K keep-alive connections, N stream or json requests in total.

usage: fixed_load.py PORT N K json|stream"""
import socket, sys, threading
port, n, k, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model = "gpt-4o-mini-stream" if mode == "stream" else "gpt-4o-mini"
body = ('{"model":"%s","messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32,"temperature":0%s}' % (model, ',"stream":true,"stream_options":{"include_usage":true}' if mode == "stream" else "")).encode()
req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-bench-0123456789abcdef\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
def worker(count):
    s = socket.create_connection(("127.0.0.1", port)); buf = b""
    for _ in range(count):
        s.sendall(req)
        while True:
            i = buf.find(b"\r\n\r\n")
            if i >= 0:
                head = buf[:i].lower()
                if b"content-length:" in head:
                    ln = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(buf) >= i + 4 + ln:
                        assert head.startswith(b"http/1.1 200"), head[:80]
                        buf = buf[i + 4 + ln:]; break
                else:
                    j = buf.find(b"\r\n0\r\n\r\n", i)
                    if j >= 0:
                        assert head.startswith(b"http/1.1 200"), head[:80]
                        buf = buf[j + 7:]; break
            d = s.recv(65536)
            if not d: raise SystemExit("closed")
            buf += d
    s.close()
ts = [threading.Thread(target=worker, args=(n // k,)) for _ in range(k)]
[t.start() for t in ts]; [t.join() for t in ts]
print("done", n)
