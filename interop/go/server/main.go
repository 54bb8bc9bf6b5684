// The original tutorial's greet server ("gRPC接入etcd"), kept as it was so
// mixed fleets can be tested against it. It registers
// /ns/<service>/<addr> with the PLAIN address as the value on a 5 s lease,
// checks every TTL that the key is still there and re-registers it when it
// is not, and deletes it on SIGTERM/SIGINT.
//
// Changes from the tutorial, none of them on the wire or in etcd:
//   - imports adapted to Debian's packages (etcd 3.4's go.etcd.io/etcd/clientv3,
//     context from the standard library, generated code under
//     go-git/etcd-demo/proto as in the tutorial's GOPATH layout);
//   - -Quiet turns off the per-call print (load tests measure the design,
//     not an unbuffered write per call);
//   - SIGKILL is no longer passed to signal.Notify (it cannot be caught;
//     the tutorial listed it but it never had an effect);
//   - -Pprof ADDR serves Go's profiler (net/http/pprof) on a side port,
//     off by default (interop/go-server-reads.sh profiles with it).
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	proto "go-git/etcd-demo/proto"

	"go.etcd.io/etcd/clientv3"
	"google.golang.org/grpc"
)

const schema = "ns"

var host = "127.0.0.1" // server host
var (
	Port        = flag.Int("Port", 3000, "listening port")
	ServiceName = flag.String("ServiceName", "greet_service", "service name")
	EtcdAddr    = flag.String("EtcdAddr", "127.0.0.1:2379", "register etcd address (several separated by ';')")
	Quiet       = flag.Bool("Quiet", false, "do not print a line per call")
	Pprof       = flag.String("Pprof", "", "serve net/http/pprof on this address (off when empty)")
)
var cli *clientv3.Client

// the rpc service
type greetServer struct{}

func (gs *greetServer) Morning(ctx context.Context, req *proto.GreetRequest) (*proto.GreetResponse, error) {
	if !*Quiet {
		fmt.Printf("Morning 调用: %s\n", req.Name)
	}
	return &proto.GreetResponse{
		Message: "Good morning, " + req.Name,
		From:    fmt.Sprintf("127.0.0.1:%d", *Port),
	}, nil
}

func (gs *greetServer) Night(ctx context.Context, req *proto.GreetRequest) (*proto.GreetResponse, error) {
	if !*Quiet {
		fmt.Printf("Night 调用: %s\n", req.Name)
	}
	return &proto.GreetResponse{
		Message: "Good night, " + req.Name,
		From:    fmt.Sprintf("127.0.0.1:%d", *Port),
	}, nil
}

// register puts the server's address in etcd and keeps it there.
func register(etcdAddr, serviceName, serverAddr string, ttl int64) error {
	var err error

	if cli == nil {
		cli, err = clientv3.New(clientv3.Config{
			Endpoints:   strings.Split(etcdAddr, ";"),
			DialTimeout: 15 * time.Second,
		})
		if err != nil {
			fmt.Printf("连接etcd失败：%s\n", err)
			return err
		}
	}

	// every TTL: is the key still there? if not, register again
	ticker := time.NewTicker(time.Second * time.Duration(ttl))
	go func() {
		key := "/" + schema + "/" + serviceName + "/" + serverAddr
		for {
			resp, err := cli.Get(context.Background(), key)
			if err != nil {
				fmt.Printf("获取服务地址失败：%s", err)
			} else if resp.Count == 0 { // not registered yet
				err = keepAlive(serviceName, serverAddr, ttl)
				if err != nil {
					fmt.Printf("保持连接失败：%s", err)
				}
			}

			<-ticker.C
		}
	}()

	return nil
}

// keepAlive grants a lease, puts the key on it and keeps the lease alive.
func keepAlive(serviceName, serverAddr string, ttl int64) error {
	leaseResp, err := cli.Grant(context.Background(), ttl)
	if err != nil {
		fmt.Printf("创建租期失败：%s\n", err)
		return err
	}

	// the value is the plain address (the legacy format)
	key := "/" + schema + "/" + serviceName + "/" + serverAddr
	_, err = cli.Put(context.Background(), key, serverAddr, clientv3.WithLease(leaseResp.ID))
	if err != nil {
		fmt.Printf("注册服务失败：%s", err)
		return err
	}

	ch, err := cli.KeepAlive(context.Background(), leaseResp.ID)
	if err != nil {
		fmt.Printf("建立长连接失败：%s\n", err)
		return err
	}

	// drain the keep-alive channel
	go func() {
		for {
			<-ch
		}
	}()
	return nil
}

// unRegister deletes the key.
func unRegister(serviceName, serverAddr string) {
	if cli != nil {
		key := "/" + schema + "/" + serviceName + "/" + serverAddr
		cli.Delete(context.Background(), key)
	}
}

func main() {
	flag.Parse()
	if *Pprof != "" {
		go func() { fmt.Println(http.ListenAndServe(*Pprof, nil)) }()
	}

	serverAddr := fmt.Sprintf("%s:%d", host, *Port)
	listener, err := net.Listen("tcp", serverAddr)
	if err != nil {
		fmt.Println("监听网络失败：", err)
		return
	}
	defer listener.Close()

	srv := grpc.NewServer()
	defer srv.GracefulStop()

	proto.RegisterGreetServer(srv, &greetServer{})

	fmt.Printf("greeting server address: %s\n", serverAddr)
	register(*EtcdAddr, *ServiceName, serverAddr, 5)

	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP, syscall.SIGQUIT)

	go func() {
		s := <-ch
		unRegister(*ServiceName, serverAddr)
		if i, ok := s.(syscall.Signal); ok {
			os.Exit(int(i))
		} else {
			os.Exit(0)
		}
	}()

	err = srv.Serve(listener)
	if err != nil {
		fmt.Println("监听异常：", err)
		return
	}
}
