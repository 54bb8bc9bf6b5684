// The original tutorial's greet client ("gRPC接入etcd"): an etcd resolver
// lists and watches /ns/<service>/ and hands the key suffixes (the values
// are never read) to grpc-go's round_robin. Every second it calls Morning
// then Night and prints the reply and which server answered.
//
// Changes from the tutorial, none of them on the wire or in etcd:
//   - imports adapted to Debian's packages (etcd 3.4's go.etcd.io/etcd/clientv3
//     and mvcc/mvccpb, context from the standard library);
//   - round_robin chosen by a default service config instead of the
//     deprecated grpc.WithBalancerName (the same balancer);
//   - -Count stops after that many rounds (0: forever, as before) and
//     -Interval sets the period;
//   - -Bench is a load mode for comparisons: -Concurrency calls in flight
//     for -Duration, then one JSON line with calls, errors, throughput,
//     p50/p99 and the calls each server answered. Failed calls are counted
//     and the run goes on (the default mode still stops at the first error).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	proto "go-git/etcd-demo/proto"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/mvcc/mvccpb"
	"google.golang.org/grpc"
	_ "google.golang.org/grpc/balancer/roundrobin"
	"google.golang.org/grpc/resolver"
)

const schema = "ns"

var (
	ServiceName = flag.String("ServiceName", "greet_service", "service name")
	EtcdAddr    = flag.String("EtcdAddr", "127.0.0.1:2379", "register etcd address (several separated by ';')")
	Count       = flag.Int("Count", 0, "rounds of Morning+Night before exiting (0: forever)")
	Interval    = flag.Duration("Interval", time.Second, "time between rounds")
	Bench       = flag.Bool("Bench", false, "load mode: print one JSON line of results")
	Concurrency = flag.Int("Concurrency", 16, "load mode: calls in flight")
	Duration    = flag.Duration("Duration", 10*time.Second, "load mode: how long")
	Timeout     = flag.Duration("Timeout", 5*time.Second, "load mode: deadline of each call")
	Expect      = flag.Int("Expect", 1, "load mode: before timing, warm up until this many servers answered (at most 10 s)")
)

var cli *clientv3.Client

// etcd resolver
type etcdResolver struct {
	etcdAddr   string
	clientConn resolver.ClientConn
}

func newResolver(etcdAddr string) resolver.Builder {
	return &etcdResolver{etcdAddr: etcdAddr}
}

func (r *etcdResolver) Scheme() string {
	return schema
}

func (r *etcdResolver) ResolveNow(rn resolver.ResolveNowOptions) {
	log.Println("ResolveNow")
}

func (r *etcdResolver) Close() {
	log.Println("Close")
}

// Build is called synchronously by grpc.Dial.
func (r *etcdResolver) Build(target resolver.Target, clientConn resolver.ClientConn, opts resolver.BuildOptions) (resolver.Resolver, error) {
	var err error

	if cli == nil {
		cli, err = clientv3.New(clientv3.Config{
			Endpoints:   strings.Split(r.etcdAddr, ";"),
			DialTimeout: 15 * time.Second,
		})
		if err != nil {
			fmt.Printf("连接etcd失败：%s\n", err)
			return nil, err
		}
	}

	r.clientConn = clientConn

	go r.watch("/" + target.Scheme + "/" + target.Endpoint + "/")

	return r, nil
}

// watch lists the prefix, then follows its changes; only key suffixes are used.
func (r *etcdResolver) watch(keyPrefix string) {
	var addrList []resolver.Address

	resp, err := cli.Get(context.Background(), keyPrefix, clientv3.WithPrefix())
	if err != nil {
		fmt.Println("获取服务地址列表失败：", err)
	} else {
		for i := range resp.Kvs {
			addrList = append(addrList, resolver.Address{Addr: strings.TrimPrefix(string(resp.Kvs[i].Key), keyPrefix)})
		}
	}

	r.clientConn.NewAddress(addrList)

	rch := cli.Watch(context.Background(), keyPrefix, clientv3.WithPrefix())
	for n := range rch {
		for _, ev := range n.Events {
			addr := strings.TrimPrefix(string(ev.Kv.Key), keyPrefix)
			switch ev.Type {
			case mvccpb.PUT:
				if !exists(addrList, addr) {
					addrList = append(addrList, resolver.Address{Addr: addr})
					r.clientConn.NewAddress(addrList)
				}
			case mvccpb.DELETE:
				if s, ok := remove(addrList, addr); ok {
					addrList = s
					r.clientConn.NewAddress(addrList)
				}
			}
		}
	}
}

func exists(l []resolver.Address, addr string) bool {
	for i := range l {
		if l[i].Addr == addr {
			return true
		}
	}
	return false
}

func remove(s []resolver.Address, addr string) ([]resolver.Address, bool) {
	for i := range s {
		if s[i].Addr == addr {
			s[i] = s[len(s)-1]
			return s[:len(s)-1], true
		}
	}
	return nil, false
}

func main() {
	flag.Parse()

	r := newResolver(*EtcdAddr)
	resolver.Register(r)

	// round robin over the resolved addresses; Dial calls r.Build synchronously
	conn, err := grpc.Dial(r.Scheme()+"://author/"+*ServiceName,
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
		grpc.WithInsecure())
	if err != nil {
		fmt.Println("连接服务器失败：", err)
		os.Exit(1)
	}
	defer conn.Close()

	c := proto.NewGreetClient(conn)
	if *Bench {
		os.Exit(bench(c))
	}

	ticker := time.NewTicker(*Interval)
	for round := 1; ; round++ {
		fmt.Println("Morning 调用...")
		resp1, err := c.Morning(
			context.Background(),
			&proto.GreetRequest{Name: "JetWu"},
		)
		if err != nil {
			fmt.Println("Morning调用失败：", err)
			os.Exit(1)
		}
		fmt.Printf("Morning 响应：%s，来自：%s\n", resp1.Message, resp1.From)

		fmt.Println("Night 调用...")
		resp2, err := c.Night(
			context.Background(),
			&proto.GreetRequest{Name: "JetWu"},
		)
		if err != nil {
			fmt.Println("Night调用失败：", err)
			os.Exit(1)
		}
		fmt.Printf("Night 响应：%s，来自：%s\n", resp2.Message, resp2.From)
		if *Count > 0 && round >= *Count {
			return
		}
		<-ticker.C
	}
}

type result struct {
	Calls       int            `json:"calls"`
	Errors      int            `json:"errors"`
	Seconds     float64        `json:"seconds"`
	Rps         float64        `json:"rps"`
	P50Ms       float64        `json:"p50_ms"`
	P99Ms       float64        `json:"p99_ms"`
	PerServer   map[string]int `json:"per_server"`
	Concurrency int            `json:"concurrency"`
	FirstErrors []string       `json:"first_errors"`
}

type worker struct {
	lat    []time.Duration
	errs   int
	errMsg []string
	from   map[string]int
}

// bench runs the load mode; the exit code is 0 when the run completed.
func bench(c proto.GreetClient) int {
	// Warm-up (not timed): until the expected number of servers answered.
	seen := map[string]bool{}
	warm := time.Now().Add(10 * time.Second)
	for len(seen) < *Expect && time.Now().Before(warm) {
		ctx, cancel := context.WithTimeout(context.Background(), *Timeout)
		resp, err := c.Morning(ctx, &proto.GreetRequest{Name: "JetWu"})
		cancel()
		if err == nil {
			seen[resp.From] = true
		} else {
			time.Sleep(10 * time.Millisecond)
		}
	}

	workers := make([]*worker, *Concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	end := start.Add(*Duration)
	for i := range workers {
		w := &worker{from: map[string]int{}, lat: make([]time.Duration, 0, 1<<16)}
		workers[i] = w
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := &proto.GreetRequest{Name: "JetWu"}
			for time.Now().Before(end) {
				t0 := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), *Timeout)
				resp, err := c.Morning(ctx, req)
				cancel()
				if err != nil {
					w.errs++
					if len(w.errMsg) < 3 {
						w.errMsg = append(w.errMsg, err.Error())
					}
					continue
				}
				w.lat = append(w.lat, time.Since(t0))
				w.from[resp.From]++
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()

	res := result{PerServer: map[string]int{}, Concurrency: *Concurrency, Seconds: elapsed, FirstErrors: []string{}}
	var all []time.Duration
	for _, w := range workers {
		all = append(all, w.lat...)
		res.Errors += w.errs
		for k, v := range w.from {
			res.PerServer[k] += v
		}
		for _, m := range w.errMsg {
			if len(res.FirstErrors) < 5 {
				res.FirstErrors = append(res.FirstErrors, m)
			}
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	res.Calls = len(all) + res.Errors
	res.Rps = float64(len(all)) / elapsed
	if len(all) > 0 {
		res.P50Ms = float64(all[len(all)*50/100].Microseconds()) / 1000
		res.P99Ms = float64(all[len(all)*99/100].Microseconds()) / 1000
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	return 0
}
