#!/bin/sh
# Build the Java example client from protos/*.proto with Debian's packages only (no Maven/Gradle):
#   apt-get install default-jdk-headless protobuf-compiler protobuf-compiler-grpc-java-plugin \
#     libprotobuf-java libgrpc-java libnetty-java libperfmark-java libguava-java libgoogle-gson-java \
#     libgeronimo-annotation-1.3-spec-java libnetty-tcnative-java
#   clients/java/build.sh [OUT]          (OUT defaults to clients/java/build)
#   OUT/infer-example --target localhost:8001 --ca ca.pem --model NAME ...
# protoc and the protobuf-java runtime come from the same Debian source (3.21.12): generated code
# must match its runtime, so this uses Debian's protoc, not grpcio-tools' bundled one.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-"$here/build"}
jars=${MEDSERVE_JAVA_JARS:-/usr/share/java}
protoc=${PROTOC:-/usr/bin/protoc}
plugin=${GRPC_JAVA_PLUGIN:-/usr/bin/grpc_java_plugin}

# What compiling the generated stubs needs, then what a Netty-transport channel needs at run time.
compile="protobuf grpc-api grpc-context grpc-stub grpc-protobuf grpc-protobuf-lite guava jsr305
  geronimo-annotation-1.3-spec"
runtime="grpc-core grpc-netty netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-codec-socks
  netty-common netty-handler netty-handler-proxy netty-resolver netty-transport netty-tcnative perfmark-api gson"

# Debian's netty leaves out the JDK's ALPN (TLS for HTTP/2), so TLS runs on OpenSSL through
# netty-tcnative; its JNI library must be loaded under the name netty looks for (a copy, not a link:
# the library checks the file name it was loaded from).
tcnative=$(ls /usr/lib/*/jni/libnetty-tcnative.so 2>/dev/null | head -n 1)
[ -n "$tcnative" ] || { echo "build.sh: libnetty-tcnative.so not found (apt-get install libnetty-tcnative-jni)" >&2; exit 3; }

for tool in "$protoc" "$plugin" javac java; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build.sh: $tool not found (see the apt-get line above)" >&2; exit 3; }
done
classpath=""
for jar in $compile $runtime; do
  [ -f "$jars/$jar.jar" ] || { echo "build.sh: $jars/$jar.jar not found (see the apt-get line above)" >&2; exit 3; }
  classpath="${classpath:+$classpath:}$jars/$jar.jar"
done

rm -rf "$out/generated" "$out/classes" "$out/native"
mkdir -p "$out/generated" "$out/classes" "$out/native"
cp "$tcnative" "$out/native/libnetty_tcnative.so"
"$protoc" --proto_path="$root/protos" \
  --java_out="$out/generated" \
  --plugin=protoc-gen-grpc-java="$plugin" --grpc-java_out="$out/generated" \
  "$root/protos/model_config.proto" "$root/protos/grpc_service.proto"
find "$out/generated" "$here/src" -name '*.java' > "$out/sources.txt"
javac -nowarn -encoding UTF-8 --release 11 -cp "$classpath" -d "$out/classes" @"$out/sources.txt"

printf '%s\n' "$classpath" > "$out/classpath"
cat > "$out/infer-example" <<EOF
#!/bin/sh
exec java -Djava.library.path="$out/native" -cp "$out/classes:$classpath" org.medserve.example.InferExample "\$@"
EOF
chmod +x "$out/infer-example"
echo "built $out/infer-example"
