package org.medserve.example;

import com.google.protobuf.ByteString;
import inference.GRPCInferenceServiceGrpc;
import inference.GRPCInferenceServiceGrpc.GRPCInferenceServiceBlockingStub;
import inference.GrpcService.InferParameter;
import inference.GrpcService.ModelInferRequest;
import inference.GrpcService.ModelInferResponse;
import inference.GrpcService.ModelMetadataRequest;
import inference.GrpcService.ModelMetadataResponse;
import inference.GrpcService.ServerReadyRequest;
import io.grpc.CallCredentials;
import io.grpc.ChannelCredentials;
import io.grpc.CompositeChannelCredentials;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.SecurityLevel;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.Executor;
import java.util.concurrent.TimeUnit;

/**
 * A medserve caller in Java: TLS trusting a given CA, a bearer token, then ServerReady,
 * ModelMetadata and ModelInfer (FP32 inputs as raw_input_contents); prints the outputs and the
 * model file's SHA-256. With {@code --forbidden M} it also checks that a model the token may not
 * use answers exactly as a model that does not exist (NOT_FOUND, same message).
 *
 * <p>Exit status: 0 done; 1 an RPC failed (its status on stderr); 2 bad usage; 3 the forbidden
 * model answered differently from a missing one.
 *
 * <p>The channel resolves {@code dns:///host:port} targets to every address and balances calls
 * round_robin over them (a Kubernetes headless Service: one address per replica).
 */
public final class InferExample {
  private static final String USAGE =
      "usage: InferExample --target HOST:PORT|dns:///HOST:PORT --model NAME [--version V]\n"
          + "         (--ca CA.pem [--server-name NAME] | --plaintext)\n"
          + "         [--token-file FILE]  (or the MEDSERVE_TOKEN environment variable)\n"
          + "         [--values 0.1,0.2,...] [--forbidden MODEL] [--timeout-s SECONDS]";

  private InferExample() {}

  /** Bad command line: exit 2. */
  private static final class UsageError extends Exception {
    UsageError(String message) {
      super(message);
    }
  }

  /** The token as {@code authorization: Bearer ...}, and only over an encrypted channel. */
  static final class BearerToken extends CallCredentials {
    private static final Metadata.Key<String> AUTHORIZATION =
        Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);
    private final String token;

    BearerToken(String token) {
      this.token = token;
    }

    @Override
    public void applyRequestMetadata(RequestInfo info, Executor executor, MetadataApplier applier) {
      if (info.getSecurityLevel() != SecurityLevel.PRIVACY_AND_INTEGRITY) {
        applier.fail(Status.UNAUTHENTICATED.withDescription(
            "refusing to send a bearer token over a channel without TLS"));
        return;
      }
      Metadata headers = new Metadata();
      headers.put(AUTHORIZATION, "Bearer " + token);
      applier.apply(headers);
    }

    @Override
    public void thisUsesUnstableApi() {}
  }

  public static void main(String[] args) {
    int code;
    try {
      code = run(parse(args));
    } catch (UsageError e) {
      System.err.println("error: " + e.getMessage());
      System.err.println(USAGE);
      code = 2;
    } catch (NumberFormatException e) {  // the text itself is not echoed: it may be a patient's value
      System.err.println("error: --values and --timeout-s take numbers");
      System.err.println(USAGE);
      code = 2;
    }
    System.exit(code);
  }

  static Map<String, String> parse(String[] args) throws UsageError {
    Map<String, String> options = new LinkedHashMap<>();
    for (int i = 0; i < args.length; i++) {
      String key = args[i];
      if (key.equals("--plaintext")) {
        options.put(key, "");
      } else if (key.startsWith("--") && i + 1 < args.length) {
        options.put(key, args[++i]);
      } else {
        throw new UsageError("unexpected argument " + key);
      }
    }
    for (String required : new String[] {"--target", "--model"}) {
      if (!options.containsKey(required)) {
        throw new UsageError(required + " is required");
      }
    }
    if (options.containsKey("--ca") == options.containsKey("--plaintext")) {
      throw new UsageError("give --ca (TLS) or --plaintext, not both or neither");
    }
    return options;
  }

  static ManagedChannel channel(Map<String, String> o) throws UsageError {
    String token = System.getenv("MEDSERVE_TOKEN");
    if (o.containsKey("--token-file")) {
      try {
        token = Files.readString(Path.of(o.get("--token-file")), StandardCharsets.UTF_8).strip();
      } catch (IOException e) {
        throw new UsageError("cannot read --token-file: " + e.getMessage());
      }
    }
    ChannelCredentials credentials;
    if (o.containsKey("--plaintext")) {
      if (token != null) {
        throw new UsageError("a bearer token travels only over TLS: give --ca");
      }
      credentials = InsecureChannelCredentials.create();
    } else {
      try {
        credentials = TlsChannelCredentials.newBuilder().trustManager(new File(o.get("--ca"))).build();
      } catch (IOException e) {
        throw new UsageError("cannot read --ca: " + e.getMessage());
      }
      if (token != null) {
        credentials = CompositeChannelCredentials.create(credentials, new BearerToken(token));
      }
    }
    ManagedChannelBuilder<?> builder =
        Grpc.newChannelBuilder(o.get("--target"), credentials)
            .defaultLoadBalancingPolicy("round_robin")
            .maxInboundMessageSize(64 << 20);
    if (o.containsKey("--server-name")) {
      builder.overrideAuthority(o.get("--server-name"));
    }
    return builder.build();
  }

  static int run(Map<String, String> o) throws UsageError {
    long timeoutS = Long.parseLong(o.getOrDefault("--timeout-s", "10"));
    ManagedChannel channel = channel(o);
    String rpc = "ServerReady";
    try {
      GRPCInferenceServiceBlockingStub stub = GRPCInferenceServiceGrpc.newBlockingStub(channel);
      boolean ready =
          stub.withDeadlineAfter(timeoutS, TimeUnit.SECONDS)
              .serverReady(ServerReadyRequest.getDefaultInstance())
              .getReady();
      System.out.println("server ready: " + ready);

      String model = o.get("--model");
      String version = o.getOrDefault("--version", "");
      rpc = "ModelMetadata";
      ModelMetadataResponse metadata =
          stub.withDeadlineAfter(timeoutS, TimeUnit.SECONDS)
              .modelMetadata(
                  ModelMetadataRequest.newBuilder().setName(model).setVersion(version).build());
      System.out.println("model: " + metadata.getName() + " versions " + metadata.getVersionsList()
          + " platform " + metadata.getPlatform());

      rpc = "ModelInfer";
      ModelInferRequest request = inferRequest(model, version, metadata, o.get("--values"));
      ModelInferResponse response =
          stub.withDeadlineAfter(timeoutS, TimeUnit.SECONDS).modelInfer(request);
      printResponse(response);

      if (o.containsKey("--forbidden")) {
        rpc = "forbidden check";
        return checkForbiddenLooksMissing(stub, timeoutS, o.get("--forbidden"), request);
      }
      return 0;
    } catch (StatusRuntimeException e) {
      Status status = e.getStatus();
      System.err.println("error: " + rpc + " failed: " + status.getCode() + ": " + status.getDescription());
      return 1;
    } finally {
      channel.shutdownNow();
    }
  }

  /** One request whose FP32 inputs follow the model's metadata (a -1 dimension becomes 1 row). */
  static ModelInferRequest inferRequest(
      String model, String version, ModelMetadataResponse metadata, String values) throws UsageError {
    ModelInferRequest.Builder request =
        ModelInferRequest.newBuilder().setModelName(model).setModelVersion(version).setId("java-example");
    for (ModelMetadataResponse.TensorMetadata input : metadata.getInputsList()) {
      if (!input.getDatatype().equals("FP32")) {
        throw new UsageError("this example sends FP32 only; input '" + input.getName() + "' is "
            + input.getDatatype());
      }
      List<Long> shape = new ArrayList<>();
      long count = 1;
      for (long dim : input.getShapeList()) {
        long d = dim < 0 ? 1 : dim;
        shape.add(d);
        count *= d;
      }
      float[] data = new float[(int) count];
      if (values != null) {
        String[] parts = values.split(",");
        if (parts.length != count) {
          throw new UsageError("--values has " + parts.length + " numbers; input '" + input.getName()
              + "' of shape " + shape + " takes " + count);
        }
        for (int i = 0; i < parts.length; i++) {
          data[i] = Float.parseFloat(parts[i].strip());
        }
      }
      ByteBuffer raw = ByteBuffer.allocate(4 * data.length).order(ByteOrder.LITTLE_ENDIAN);
      for (float v : data) {
        raw.putFloat(v);
      }
      request.addInputs(
          ModelInferRequest.InferInputTensor.newBuilder()
              .setName(input.getName())
              .setDatatype("FP32")
              .addAllShape(shape));
      request.addRawInputContents(ByteString.copyFrom(raw.array()));
    }
    return request.build();
  }

  static void printResponse(ModelInferResponse response) {
    System.out.println("version: " + response.getModelVersion());
    for (int i = 0; i < response.getOutputsCount(); i++) {
      ModelInferResponse.InferOutputTensor output = response.getOutputs(i);
      String values = i < response.getRawOutputContentsCount()
          ? decode(output.getDatatype(), response.getRawOutputContents(i))
          : "(no raw contents)";
      System.out.println("output " + output.getName() + " " + output.getDatatype() + " "
          + output.getShapeList() + " = " + values);
    }
    InferParameter sha = response.getParametersMap().get("model_sha256");
    System.out.println("model_sha256: " + (sha == null ? "(not sent)" : sha.getStringParam()));
  }

  /** Raw little-endian contents as text (KServe V2's layout; BYTES: 4-byte length, then bytes). */
  static String decode(String datatype, ByteString raw) {
    ByteBuffer b = raw.asReadOnlyByteBuffer().order(ByteOrder.LITTLE_ENDIAN);
    List<String> out = new ArrayList<>();
    while (b.hasRemaining()) {
      switch (datatype) {
        case "FP32": out.add(Float.toString(b.getFloat())); break;
        case "FP64": out.add(Double.toString(b.getDouble())); break;
        case "INT64": case "UINT64": out.add(Long.toString(b.getLong())); break;
        case "INT32": case "UINT32": out.add(Integer.toString(b.getInt())); break;
        case "INT16": case "UINT16": out.add(Short.toString(b.getShort())); break;
        case "INT8": case "UINT8": out.add(Byte.toString(b.get())); break;
        case "BOOL": out.add(Boolean.toString(b.get() != 0)); break;
        case "BYTES": {
          byte[] item = new byte[b.getInt()];
          b.get(item);
          out.add('"' + new String(item, StandardCharsets.UTF_8) + '"');
          break;
        }
        default: return "(" + raw.size() + " bytes of " + datatype + ")";
      }
    }
    return out.toString();
  }

  /**
   * The model the token may not use must be indistinguishable from one that does not exist:
   * ModelMetadata and ModelInfer both answer NOT_FOUND with the same message, the name aside.
   */
  static int checkForbiddenLooksMissing(
      GRPCInferenceServiceBlockingStub stub, long timeoutS, String forbidden, ModelInferRequest sample) {
    String missing = "no-such-model-" + UUID.randomUUID();
    int failures = 0;
    for (String rpc : new String[] {"ModelMetadata", "ModelInfer"}) {
      Status a = callFor(stub, timeoutS, rpc, forbidden, sample);
      Status b = callFor(stub, timeoutS, rpc, missing, sample);
      String aText = String.valueOf(a.getDescription()).replace(forbidden, "<model>");
      String bText = String.valueOf(b.getDescription()).replace(missing, "<model>");
      boolean same = a.getCode() == Status.Code.NOT_FOUND && b.getCode() == Status.Code.NOT_FOUND
          && aText.equals(bText);
      System.out.println("forbidden " + rpc + ": " + a.getCode() + " \"" + aText + "\"; missing: "
          + b.getCode() + " \"" + bText + "\" -> " + (same ? "same" : "DIFFERENT"));
      if (!same) {
        failures++;
      }
    }
    return failures == 0 ? 0 : 3;
  }

  private static Status callFor(
      GRPCInferenceServiceBlockingStub stub, long timeoutS, String rpc, String model, ModelInferRequest sample) {
    GRPCInferenceServiceBlockingStub s = stub.withDeadlineAfter(timeoutS, TimeUnit.SECONDS);
    try {
      if (rpc.equals("ModelMetadata")) {
        s.modelMetadata(ModelMetadataRequest.newBuilder().setName(model).build());
      } else {
        s.modelInfer(sample.toBuilder().setModelName(model).setModelVersion("").build());
      }
      return Status.OK;
    } catch (StatusRuntimeException e) {
      return e.getStatus();
    }
  }
}
